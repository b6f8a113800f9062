"""lm.kernel_choices: the int8_matvec rows measured at one load are read back at the next on the same
machine (no measurement, the same kernels), per machine fingerprint; a broken file is measured over."""

from __future__ import annotations

import json

import pytest
import torch

import lm.models.gemma3 as gemma3
from lm.kernel_choices import ENVIRONMENT, KernelChoices, cache_path
from lm.layers import fuse_projections
from lm.quantize import Int8DynamicLinear, quantize_model
from test_lm_engine import tiny_config


def _quantized():
    torch.manual_seed(0)
    model = gemma3.Gemma3TextModel(tiny_config(hidden_size=128, intermediate_size=256, vocab_size=300))
    return quantize_model(fuse_projections(model.eval()), "int8-dynamic")


def _rows(model) -> list[int]:
    return [module.matvec_rows for module in model.modules() if isinstance(module, Int8DynamicLinear)]


def test_choices_are_kept_and_read_back(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    monkeypatch.setenv(ENVIRONMENT, str(path))
    measured = _quantized()
    data = json.loads(path.read_text())
    (section,) = data.values()
    # one entry per projection shape and one for the head, each the rows the layers of that shape took
    assert len(section["choices"]) == len({(m.out_features, m.in_features, m.per_token)
                                           for m in measured.modules() if isinstance(m, Int8DynamicLinear)})
    assert section["fingerprint"]["torch"] == torch.__version__

    def refuse(*args, **kwargs):
        raise AssertionError("measured again although the choices were kept")

    monkeypatch.setattr(Int8DynamicLinear, "choose_matvec_rows", refuse)
    read_back = _quantized()
    assert _rows(read_back) == _rows(measured)
    head = read_back.lm_head
    assert head._rows is not None or head.matvec_rows == 0  # the operands exist where the rows say so


def test_another_machine_and_a_broken_file_are_measured(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    monkeypatch.setenv(ENVIRONMENT, str(path))
    path.write_text(json.dumps({"another machine": {"fingerprint": {}, "choices": {"head 300x128": 7}}}))
    calls = []
    original = Int8DynamicLinear.choose_matvec_rows

    def counted(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Int8DynamicLinear, "choose_matvec_rows", counted)
    _quantized()
    assert calls  # the other machine's section is not this one's
    assert "another machine" in json.loads(path.read_text())  # and it is kept
    calls.clear()
    path.write_text("{ not json")
    _quantized()
    assert calls and json.loads(path.read_text())  # measured, and the file replaced by a valid one


def test_off_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(ENVIRONMENT, "off")
    assert cache_path() is None
    monkeypatch.setenv("HOME", str(tmp_path))
    _quantized()
    assert not any(tmp_path.rglob("*.json"))
    choices = KernelChoices.load()
    choices.put("head 1x1", 1)
    choices.save()  # nowhere to write: nothing happens
    assert choices.get("head 1x1") == 1


@pytest.mark.parametrize("value", [-1, "3", True, None])
def test_malformed_entries_are_measured(tmp_path, monkeypatch, value):
    path = tmp_path / "choices.json"
    monkeypatch.setenv(ENVIRONMENT, str(path))
    machine = KernelChoices.load().machine
    path.write_text(json.dumps({machine: {"fingerprint": {}, "choices": {"head 300x128": value}}}))
    assert KernelChoices.load().get("head 300x128") is None
