"""Strict loading of the vision tower + projector: key layouts, and errors that name the bad keys."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from vision.weights import VISION_NAMESPACES, CheckpointError, load_vision_model
from vision_checkpoints import INDEX, read_all, renamed, with_random_projector, write_sharded


@pytest.fixture(scope="module")
def vlm_dir(tiny_vlm_dir, tmp_path_factory):
    return with_random_projector(tiny_vlm_dir, tmp_path_factory.mktemp("tiny-vlm-proj"))


@pytest.fixture(scope="module")
def tiles():
    return torch.rand(1, 3, 896, 896, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def expected(vlm_dir, tiles):
    with torch.inference_mode():
        return load_vision_model(vlm_dir)(tiles)


def published(key: str) -> str:
    return re.sub(r"^vision_tower\.", "vision_tower.vision_model.", key)


def model_prefixed(key: str) -> str:
    return "model." + key if key.startswith(("vision_tower.", "multi_modal_projector.")) else key


LAYOUTS = {
    "published": published,
    "model.vision_tower.vision_model": lambda key: model_prefixed(published(key)),
    "model.vision_tower": model_prefixed,
}


@pytest.mark.parametrize("single_file", [False, True], ids=["sharded", "single-file"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_key_layout_loads_the_same_weights(vlm_dir, tmp_path, tiles, expected, layout, single_file):
    checkpoint = renamed(vlm_dir, tmp_path / layout, LAYOUTS[layout], single_file=single_file)
    with torch.inference_mode():
        torch.testing.assert_close(load_vision_model(checkpoint)(tiles), expected, atol=0, rtol=0)


def corrupted(vlm_dir, tmp_path, edit) -> "Path":  # noqa: F821
    tensors = read_all(vlm_dir)
    edit(tensors)
    return write_sharded(tensors, tmp_path / "corrupted", vlm_dir)


def test_missing_key_is_named(vlm_dir, tmp_path):
    key = "vision_tower.encoder.layers.1.mlp.fc2.bias"
    checkpoint = corrupted(vlm_dir, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): " + re.escape(key)):
        load_vision_model(checkpoint)


def test_wrong_shape_is_named(vlm_dir, tmp_path):
    key = "vision_tower.encoder.layers.0.self_attn.q_proj.weight"

    def edit(tensors):
        tensors[key] = tensors[key][:, :40].clone()

    with pytest.raises(CheckpointError, match=re.escape(f"{key} has shape [48, 40], expected [48, 48]")):
        load_vision_model(corrupted(vlm_dir, tmp_path, edit))


@pytest.mark.parametrize(
    "extra",
    ["vision_tower.head.probe", "vision_tower.vision_model.post_layernorm.weight", "multi_modal_projector.bias"],
)
def test_unexpected_key_is_named(vlm_dir, tmp_path, extra):
    checkpoint = corrupted(vlm_dir, tmp_path, lambda t: t.__setitem__(extra, torch.zeros(48)))
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): " + re.escape(extra)):
        load_vision_model(checkpoint)


def test_config_with_more_layers_than_the_checkpoint(vlm_dir, tmp_path):
    checkpoint = tmp_path / "deeper"
    shutil.copytree(vlm_dir, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 3
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"16 missing key\(s\): vision_tower\.encoder\.layers\.2\."):
        load_vision_model(checkpoint)


def test_text_only_checkpoint_has_no_vision_tower(vlm_dir, tmp_path):
    checkpoint = corrupted(
        vlm_dir, tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith(VISION_NAMESPACES)]
    )
    with pytest.raises(CheckpointError, match="no vision tower"):
        load_vision_model(checkpoint)


def test_language_model_shards_are_not_read(tiny_vlm_dir, tmp_path, tiles):
    from safetensors import safe_open

    with torch.inference_mode():
        expected = load_vision_model(tiny_vlm_dir)(tiles)
    checkpoint = tmp_path / "lm-garbage"
    shutil.copytree(tiny_vlm_dir, checkpoint)
    weight_map = json.loads((checkpoint / INDEX).read_text())["weight_map"]
    vision_files = {f for k, f in weight_map.items() if k.startswith(VISION_NAMESPACES)}
    lm_only = set(weight_map.values()) - vision_files
    assert lm_only, "the test needs at least one shard without vision keys"
    for name in lm_only:
        (checkpoint / name).write_bytes(b"not a safetensors file")
        with pytest.raises(Exception):  # proves a read of these shards would fail
            safe_open(str(checkpoint / name), framework="pt")
    with torch.inference_mode():
        torch.testing.assert_close(load_vision_model(checkpoint)(tiles), expected, atol=0, rtol=0)


def test_dtype_is_the_callers_choice(vlm_dir):
    model = load_vision_model(vlm_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_index_pointing_at_the_wrong_shard_is_named(vlm_dir, tmp_path):
    checkpoint = tmp_path / "bad-index"
    shutil.copytree(vlm_dir, checkpoint)
    index = json.loads((checkpoint / INDEX).read_text())
    key = "vision_tower.post_layernorm.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][key])
    index["weight_map"][key] = other
    (checkpoint / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"places {key} in {other}")):
        load_vision_model(checkpoint)
