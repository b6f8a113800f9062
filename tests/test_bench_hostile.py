"""`tessera bench hostile` at tiny durations against a real server (tiny random vision-language
checkpoint with the 270M's tokenizer): the harness measures both phases, every hostile input is
answered during the hostile phase with its expected status, no health check fails and no running
stream breaks. Latency ratios are the benchmark's to report, not asserted here."""

from __future__ import annotations

import pytest

from service_fixtures import start_server


@pytest.fixture(scope="module")
def server(tiny_vlm_tok_dir):
    running = start_server(model=str(tiny_vlm_tok_dir))
    yield running
    running.stop()


def test_hostile_requests_get_their_statuses_while_health_and_streams_keep_going(server, capsys):
    from service.bench.hostile import measure, print_report

    report = measure(server.target, idle_s=0.5, hostile_s=1.0, streams=2, hostile_clients=2, pause_s=0.0)

    assert report.unexpected == {}, report.unexpected
    assert report.answered_in_hostile_phase == set(report.expected)
    for name, expected in report.expected.items():
        assert set(report.codes[name]) == {expected}, (name, report.codes[name])
    assert report.health_failures == [] and report.broken_streams == []
    for phase in ("idle", "hostile"):
        assert report.health[phase] and report.gaps[phase], phase  # both phases measured
    assert report.ok
    print_report(report)
    assert "goal p99 <= 2x idle" in capsys.readouterr().out


def test_the_benchmark_is_a_tessera_bench_target():
    from service.cli import build_parser

    args = build_parser().parse_args(["bench", "hostile", "--idle-seconds", "2", "--hostile-pause-ms", "0"])
    assert (args._bench_module, args.idle_seconds, args.hostile_pause_ms) == ("service.bench.hostile", 2.0, 0.0)
