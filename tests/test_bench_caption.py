"""`tessera bench caption` at a tiny size: both sides run, alternate and are compared by median time.
Throughputs are the benchmark's to report, not asserted here."""

from __future__ import annotations

import re

import pytest


def test_caption_benchmark_runs_both_sides_alternating(capsys):
    from service.bench import run
    from service.cli import build_parser

    args = build_parser().parse_args(["bench", "caption", "--images", "2", "--new-tokens", "2", "--repeats", "2",
                                      "--threads", "1"])
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "2 synthetic photos" in out and "2 alternating runs" in out
    for side in ("tessera caption", "transformers loop"):
        line = next(line for line in out.splitlines() if side in line)
        runs = [float(x) for x in re.search(r"runs ([\d., ]+)\)", line).group(1).split(", ")]
        assert len(runs) == 2 and all(r > 0 for r in runs)
    assert re.search(r"ratio: \d+\.\d\dx", out)


def test_caption_benchmark_refuses_a_count_below_one(capsys):
    from service.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["bench", "caption", "--repeats", "0"])
    assert exited.value.code == 2 and "argument --repeats: must be at least 1" in capsys.readouterr().err
