"""Metrics: id shape (counters 4, 8...; gauges 5...; histograms 6...), increment/record/get
semantics per type, BAD_ARGUMENT / NOT_FOUND cases."""

from __future__ import annotations

import pytest

OK, NOT_FOUND, BAD_ARGUMENT, INVALID_MEMORY = 0, 1, 2, 6


def test_metric_id_shape(make) -> None:  # type: ignore[no-untyped-def]
    run = make("configure define_metric 0 s:c1\nconfigure define_metric 1 s:g1\n"
               "configure define_metric 2 s:h1\nconfigure define_metric 0 s:c2\n"
               "configure define_metric 0 s:c1\nconfigure define_metric 3 s:bad\n")
    recs = run.recs("configure")
    assert [r.num() for r in recs[:5]] == [4, 5, 6, 8, 12]
    assert recs[5].status == BAD_ARGUMENT
    assert set(run.metrics()) == {"c1", "g1", "h1", "c2"}


def test_counter(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick define_metric 0 s:hits\ntick increment_metric $metric 5\n"
               "tick increment_metric $metric 0\ntick increment_metric $metric -1\n"
               "tick record_metric $metric 3\ntick get_metric $metric\n")
    run.tick()
    assert [r.status for r in run.recs("tick")[1:5]] == [OK, BAD_ARGUMENT, BAD_ARGUMENT, OK]
    assert run.one("tick", "get_metric").num() == 8
    assert run.metrics()["hits"] == 8


def test_gauge(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick define_metric 1 s:level\ntick record_metric $metric 10\n"
               "tick increment_metric $metric -3\ntick get_metric $metric\n"
               "tick record_metric $metric 2\ntick get_metric $metric\n")
    run.tick()
    assert [r.status for r in run.recs("tick")] == [OK] * 6
    assert [r.num() for r in run.recs("tick", "get_metric")] == [7, 2]
    assert run.metrics()["level"] == 2


def test_histogram(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick define_metric 2 s:lat\ntick record_metric $metric 12\n"
               "tick record_metric $metric 700\ntick increment_metric $metric 1\n"
               "tick get_metric $metric\n")
    run.tick()
    assert [r.status for r in run.recs("tick")] == [OK, OK, OK, BAD_ARGUMENT, BAD_ARGUMENT]
    assert run.metrics()["lat"] == 2


@pytest.mark.parametrize("op", ["increment_metric 400 1", "record_metric 400 1", "get_metric 400",
                                "increment_metric 0 1", "get_metric 7"])
def test_unknown_metric_id(make, op: str) -> None:  # type: ignore[no-untyped-def]
    run = make(f"tick {op}\n")
    run.tick()
    assert run.one("tick", op.split()[0]).status == NOT_FOUND


def test_metric_bad_pointers(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick define_metric 0 bad\ntick define_metric 0 s:x !badout\n"
               "tick define_metric 1 s:g\ntick get_metric $metric !badout\n")
    run.tick()
    assert [r.status for r in run.recs("tick")] == [INVALID_MEMORY, INVALID_MEMORY, OK,
                                                    INVALID_MEMORY]


def test_metrics_shared_between_stream_and_root(make) -> None:  # type: ignore[no-untyped-def]
    run = make("configure define_metric 0 s:req\nrequest_headers increment_metric 4 2\n")
    from .conftest import REQUEST

    for _ in range(3):
        run.http_context().request_headers(REQUEST, True)
    assert run.metrics()["req"] == 6
