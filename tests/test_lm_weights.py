"""Strict decoder loading: the three key layouts, sharded and single-file checkpoints, and errors that
name the offending key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lm.weights import CheckpointError, load_text_model

PUBLISHED_PREFIX = "language_model.model."  # what the fixture (transformers 5.23 save_pretrained) writes


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(checkpoint / file, framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def _write(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in tensors.items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def vlm(tiny_vlm_dir):
    return _tensors(tiny_vlm_dir), json.loads((tiny_vlm_dir / "config.json").read_text())


def _as_causal_lm(tensors: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The decoder alone in the Gemma3ForCausalLM layout (model.*) with its text config at top level."""
    decoder = {"model." + k[len(PUBLISHED_PREFIX):]: v for k, v in tensors.items() if k.startswith(PUBLISHED_PREFIX)}
    return decoder, {**config["text_config"], "architectures": ["Gemma3ForCausalLM"]}


def _state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_text_model(checkpoint, dtype=torch.float32, device="cpu")[1].state_dict()


def test_three_key_layouts_load_identical_weights(tmp_path, tiny_vlm_dir, vlm):
    tensors, config = vlm
    newer = {  # model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*
        ("model.language_model." + k[len(PUBLISHED_PREFIX):] if k.startswith(PUBLISHED_PREFIX) else "model." + k): v
        for k, v in tensors.items()
    }
    states = [
        _state(tiny_vlm_dir),
        _state(_write(tmp_path / "newer", newer, config)),
        _state(_write(tmp_path / "causal", *_as_causal_lm(tensors, config))),
    ]
    # q, k and v are fused at load (lm.layers.fuse_projections), in that order; so are gate and up
    attn, mlp = PUBLISHED_PREFIX + "layers.3.self_attn.", PUBLISHED_PREFIX + "layers.3.mlp."
    assert torch.equal(states[0]["layers.3.self_attn.qkv_proj.weight"],
                       torch.cat([tensors[attn + f"{name}_proj.weight"] for name in "qkv"]))
    assert torch.equal(states[0]["layers.3.mlp.gate_up_proj.weight"],
                       torch.cat([tensors[mlp + f"{name}_proj.weight"] for name in ("gate", "up")]))
    assert torch.equal(states[0]["norm.weight"], tensors[PUBLISHED_PREFIX + "norm.weight"])
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        assert all(torch.equal(state[name], states[0][name]) for name in state)


def test_only_decoder_shards_are_read(tmp_path, tiny_vlm_dir):
    copy = Path(shutil.copytree(tiny_vlm_dir, tmp_path / "ckpt"))
    weight_map = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
    decoder_files = {f for k, f in weight_map.items() if k.startswith(PUBLISHED_PREFIX)}
    vision_only = set(weight_map.values()) - decoder_files
    assert vision_only, "fixture has no vision-only shard; the test would prove nothing"
    for file in vision_only:
        (copy / file).write_bytes(b"not a safetensors file")
    assert torch.equal(_state(copy)["embed_tokens.weight"], _state(tiny_vlm_dir)["embed_tokens.weight"])


def test_dtype_and_device_come_from_the_caller(tiny_vlm_dir):
    config, model = load_text_model(tiny_vlm_dir, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope["full_attention"].inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32
    before = model.rope["sliding_attention"].inv_freq.clone()
    model.to(torch.float16)
    assert torch.equal(model.rope["sliding_attention"].inv_freq, before)
    assert not model.training


def test_tied_head_is_accepted_only_when_equal_to_the_embeddings(tmp_path, vlm):
    decoder, config = _as_causal_lm(*vlm)
    embed = decoder["model.embed_tokens.weight"]
    loaded = _state(_write(tmp_path / "equal", {**decoder, "lm_head.weight": embed.clone()}, config))
    assert torch.equal(loaded["embed_tokens.weight"], embed)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs"):
        load_text_model(_write(tmp_path / "differs", {**decoder, "lm_head.weight": embed + 1}, config))


def test_untied_head_is_required_and_used(tmp_path, vlm):
    decoder, config = _as_causal_lm(*vlm)
    config = {**config, "tie_word_embeddings": False}
    with pytest.raises(CheckpointError, match=r"missing keys: lm_head\.weight"):
        load_text_model(_write(tmp_path / "missing", decoder, config))
    head = torch.randn_like(decoder["model.embed_tokens.weight"])
    _, model = load_text_model(_write(tmp_path / "untied", {**decoder, "lm_head.weight": head}, config))
    hidden = torch.randn(2, 64)
    assert torch.allclose(model.logits(hidden), hidden @ head.T, atol=1e-5)


def test_missing_tensor_is_named(tmp_path, vlm):
    decoder, config = _as_causal_lm(*vlm)
    del decoder["model.layers.4.self_attn.q_norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: model\.layers\.4\.self_attn\.q_norm\.weight"):
        load_text_model(_write(tmp_path / "ckpt", decoder, config))


def test_wrong_shape_is_named(tmp_path, vlm):
    decoder, config = _as_causal_lm(*vlm)
    decoder["model.layers.2.mlp.up_proj.weight"] = torch.zeros(96, 64)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight has shape \[96, 64\].*\[128, 64\]"):
        load_text_model(_write(tmp_path / "ckpt", decoder, config))


def test_unexpected_key_in_the_decoder_namespace_is_named(tmp_path, vlm):
    decoder, config = _as_causal_lm(*vlm)
    decoder["model.layers.7.self_attn.q_proj.weight"] = torch.zeros(128, 64)  # an 8th layer of 7
    with pytest.raises(CheckpointError, match=r"unexpected keys .*model\.layers\.7\.self_attn\.q_proj\.weight"):
        load_text_model(_write(tmp_path / "ckpt", decoder, config))


def test_not_a_checkpoint(tmp_path, vlm):
    (tmp_path / "config.json").write_text(json.dumps(vlm[1]))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_text_model(tmp_path)
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no decoder embedding"):
        load_text_model(tmp_path)


@pytest.mark.parametrize("keep", ["header", "data"])
def test_a_truncated_file_is_named(tmp_path, vlm, keep):
    """What an interrupted download leaves: a file cut inside its header or inside its data. Both the
    decoder's and the vision tower's loaders name the file in a ValueError (the CLI's exit status 2)."""
    from vision.weights import load_vision_model

    decoder, config = _as_causal_lm(*vlm)
    checkpoint = _write(tmp_path / "ckpt", decoder, config)
    file = checkpoint / "model.safetensors"
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[:1000 if keep == "header" else size - 100])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_text_model(checkpoint)
    vision = _write(tmp_path / "vlm", *vlm)
    (vision / "model.safetensors").write_bytes((vision / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_vision_model(vision)
