"""`tessera bench moe` at tiny shapes and one repeat: it is a bench target, runs every side (both
int8 schemes too) at every token count, finds Tessera's block equal to transformers' (it exits non-zero
otherwise) and prints the ratios. Throughputs are the benchmark's to report, not asserted here."""

from __future__ import annotations


def test_moe_benchmark_runs_at_tiny_shapes(capsys):
    from service.bench import run
    from service.cli import build_parser

    args = build_parser().parse_args([
        "bench", "moe", "--hidden-size", "32", "--moe-intermediate-size", "16", "--num-experts", "16",
        "--top-k", "4", "--tokens", "1,8,20", "--repeats", "1", "--threads", "1", "--quantize", "int8,int8-dynamic"])
    assert args._bench_module == "service.bench.moe"

    assert run(args) == 0
    out = capsys.readouterr().out
    assert "hidden 32, 16 experts x 16, top-4" in out
    for n in (1, 8, 20):
        assert f"ratio at {n} tokens: tessera / transformers eager" in out
        for scheme in ("int8", "int8-dynamic"):
            assert f"  {scheme} at {n} tokens: tessera {scheme} / transformers eager" in out
    assert out.count("(goal >= 2x)") == 3  # at 8 tokens, fp32 and both schemes; 512 is not in this run
