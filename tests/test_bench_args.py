"""`tessera bench` refuses arguments it cannot run with as a usage error (exit 2, naming the flag), before
any work: counts and sizes of 0 or less, a model that does not exist, more experts per token than there are."""

from __future__ import annotations

import pytest

from service.cli import main


@pytest.mark.parametrize("argv, flag", [
    (["preprocess", "--repeats", "0"], "--repeats"), (["preprocess", "--threads", "-1"], "--threads"),
    (["engine", "--requests", "-3"], "--requests"), (["moe", "--tokens", "1,0"], "--tokens"),
    (["kernels", "--rows", "x"], "--rows"), (["serve", "--clients", "0"], "--clients"),
    (["lm", "--new-tokens", "0"], "--new-tokens"), (["caption", "--concurrency", "0"], "--concurrency"),
    (["hostile", "--streams", "-1"], "--streams"),
])
def test_counts_below_one_are_usage_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", *argv])
    assert exited.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["lm", "--model", "/nonexistent"], "--model /nonexistent:"), (["kernels", "--model", "nope"], "--model nope:"),
    (["moe", "--top-k", "999"], "--top-k 999 must be at most --num-experts (128)"),
])
def test_impossible_settings_are_named_before_any_work(argv, words, capsys):
    assert main(["bench", *argv]) == 2
    assert words in capsys.readouterr().err
