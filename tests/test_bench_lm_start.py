"""`tessera bench lm`'s cold and warm start (service.bench.lm.start_seconds): fresh processes, from spawn
to first token, on empty caches and then on the caches the first one filled."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.bench.lm import start_seconds
from service.tiny_checkpoints import write_tiny_captioning_checkpoint


@pytest.mark.slow  # ~45 s: the cold start compiles every numba kernel (the suite keeps to its 15 minutes)
def test_the_cold_start_fills_the_caches_a_later_start_reads_without_compiling(tmp_path):
    checkpoint = write_tiny_captioning_checkpoint(tmp_path / "tiny")
    caches = tmp_path / "caches"
    caches.mkdir()
    cold, warm = start_seconds(str(checkpoint), None, 1, directory=caches)
    assert cold > 0 and warm > 0
    assert list((caches / "numba").rglob("*.nbi")), "the processes did not compile into the given NUMBA_CACHE_DIR"
    # A third start on the same caches, with numba reporting its cache traffic: everything is loaded, nothing
    # compiled and saved (so the warm figure is a start without compilation).
    env = dict(os.environ, NUMBA_CACHE_DIR=str(caches / "numba"), NUMBA_DEBUG_CACHE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "service.bench.lm", "--first-token", str(checkpoint), "--threads", "1",
                           "--cache-dir", str(caches / "models")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[cache] data loaded" in done.stdout
    assert "[cache] data saved" not in done.stdout, [line for line in done.stdout.splitlines() if "saved" in line][:5]


def test_a_directory_with_something_in_it_is_refused_before_any_start(tmp_path):
    (tmp_path / "left-over").mkdir()
    for directory in (tmp_path, tmp_path / "a-file"):
        (tmp_path / "a-file").write_text("")
        with pytest.raises(ValueError, match="needs an empty directory"):
            start_seconds("gemma3-270m", None, 1, directory=directory)


def test_a_start_that_fails_names_the_process_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(RuntimeError, match="failed \\(exit 1\\)") as error:
        start_seconds(str(missing), None, 1, directory=tmp_path)
    assert "no-such-model" in str(error.value)
