"""Shared data with CAS and shared queues (register/resolve/enqueue/dequeue, on_queue_ready)."""

from __future__ import annotations

from .conftest import REQUEST

OK, NOT_FOUND, EMPTY, CAS_MISMATCH = 0, 1, 7, 8


def test_shared_data_cas(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick set_shared_data s:k s:v1 0\n"
               "tick get_shared_data s:k\n"
               "tick set_shared_data s:k s:v2 99999\n"
               "tick get_shared_data s:k\n")
    run.tick()
    set1, get1, bad_cas, get2 = run.recs("tick")
    assert (set1.status, get1.status, get1.out) == (OK, OK, b"v1")
    cas = get1.num(1)
    assert cas > 0
    assert bad_cas.status == CAS_MISMATCH
    assert (get2.out, get2.num(1)) == (b"v1", cas)
    assert run.shared_data == {b"k": b"v1"}


def test_shared_data_matching_cas_and_new_cas(make) -> None:  # type: ignore[no-untyped-def]
    run = make("configure set_shared_data s:k s:v1 0\nconfigure get_shared_data s:k\n"
               "request_headers set_shared_data s:k s:v2 1\n"
               "request_headers get_shared_data s:k\n"
               "request_headers set_shared_data s:k s:v3 1\n"
               "request_headers set_shared_data s:new s:n 12345\n")
    assert run.one("configure", "get_shared_data").num(1) == 1  # CAS counter starts at 1
    run.http_context().request_headers(REQUEST, True)
    ok, get, stale, new = run.recs("request_headers")
    assert ok.status == OK
    assert get.out == b"v2" and get.num(1) == 2
    assert stale.status == CAS_MISMATCH
    assert new.status == OK  # a new key accepts any cas
    assert run.shared_data == {b"k": b"v2", b"new": b"n"}


def test_shared_data_missing_and_seen_across_callbacks(make) -> None:  # type: ignore[no-untyped-def]
    run = make("configure get_shared_data s:x\nconfigure set_shared_data s:x s:%00bin 0\n"
               "request_headers get_shared_data s:x\n")
    run.http_context().request_headers(REQUEST, True)
    assert run.one("configure", "get_shared_data").status == NOT_FOUND
    assert run.one("request_headers", "get_shared_data").out == b"\0bin"


def test_queue_round_trip(make) -> None:  # type: ignore[no-untyped-def]
    run = make("configure register_shared_queue s:q\n"
               "configure register_shared_queue s:q\n"
               "configure resolve_shared_queue s: s:q\n"
               "configure resolve_shared_queue s:other-vm s:q\n"
               "configure enqueue_shared_queue $token s:a\n"
               "configure enqueue_shared_queue $token s:b\n"
               "configure dequeue_shared_queue $token\n"
               "configure dequeue_shared_queue $token\n"
               "configure dequeue_shared_queue $token\n"
               "configure enqueue_shared_queue 4242 s:x\n"
               "configure dequeue_shared_queue 4242\n")
    recs = run.recs("configure")
    token = recs[0].num()
    assert token > 0 and recs[1].num() == token and recs[2].num() == token
    assert [(r.op, r.status, r.outs) for r in recs[3:]] == [
        ("resolve_shared_queue", NOT_FOUND, (b"0",)),
        ("enqueue_shared_queue", OK, ()), ("enqueue_shared_queue", OK, ()),
        ("dequeue_shared_queue", OK, (b"a",)), ("dequeue_shared_queue", OK, (b"b",)),
        ("dequeue_shared_queue", EMPTY, (b"",)),
        ("enqueue_shared_queue", NOT_FOUND, ()), ("dequeue_shared_queue", NOT_FOUND, (b"",))]


def test_queue_ready_delivered_with_token(make) -> None:  # type: ignore[no-untyped-def]
    run = make("configure register_shared_queue s:jobs\n"
               "queue_ready dequeue_shared_queue $token\n"
               "request_headers resolve_shared_queue s: s:jobs\n"
               "request_headers enqueue_shared_queue $token s:from-stream\n")
    token = run.one("configure", "register_shared_queue").num()
    run.enqueue("jobs", b"from-host")
    assert run.enters("queue_ready") == [("queue_ready", (1, token))]
    assert run.one("queue_ready", "dequeue_shared_queue").out == b"from-host"
    run.http_context().request_headers(REQUEST, True)
    assert run.enters("queue_ready")[-1] == ("queue_ready", (1, token))
    assert run.order()[-2:] == ["request_headers", "queue_ready"]  # after the callback
    assert run.one("queue_ready", "dequeue_shared_queue").out == b"from-stream"
    assert run.queue_items("jobs") == []
