"""proxy_call_foreign_function built-ins and proxy_on_foreign_function."""

from __future__ import annotations

import struct
import zlib

import pytest

OK, NOT_FOUND, SERIALIZATION_FAILURE = 0, 1, 3


def _pct(data: bytes) -> str:
    return "".join(f"%{b:02X}" for b in data)


@pytest.mark.parametrize(("level", "value"), [("trace", 0), ("debug", 1), ("info", 2)])
def test_get_log_level_foreign(make, level: str, value: int) -> None:  # type: ignore[no-untyped-def]
    run = make("configure call_foreign_function s:get_log_level s:\n", log_level=level)
    rec = run.one("configure", "call_foreign_function")
    assert (rec.status, rec.out) == (OK, struct.pack("<I", value))


def test_get_log_level_follows_set_log_level(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick call_foreign_function s:get_log_level s:\ntick get_log_level\n")
    run.tick()
    run.set_log_level("trace")
    run.tick()
    foreign = [r.out for r in run.recs("tick", "call_foreign_function")]
    assert foreign == [struct.pack("<I", 1), struct.pack("<I", 0)]
    assert [r.num() for r in run.recs("tick", "get_log_level")] == [1, 0]


def test_compress_uncompress_round_trip(make) -> None:  # type: ignore[no-untyped-def]
    text = b"hello hello hello hello\0\xff"
    packed = zlib.compress(b"unpacked!")
    run = make(f"tick call_foreign_function s:compress s:{_pct(text)}\n"
               f"tick call_foreign_function s:uncompress s:{_pct(packed)}\n"
               "tick call_foreign_function s:uncompress s:garbage\n")
    run.tick()
    comp, uncomp, garbage = run.recs("tick")
    assert comp.status == OK and zlib.decompress(comp.out) == text
    assert (uncomp.status, uncomp.out) == (OK, b"unpacked!")
    assert garbage.status == SERIALIZATION_FAILURE


def test_unknown_and_accepting_foreign_functions(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick call_foreign_function s:no_such_fn s:x\n"
               "tick call_foreign_function s:clear_route_cache s:\n")
    run.tick()
    assert [(r.status, r.out) for r in run.recs("tick")] == [(NOT_FOUND, b""), (OK, b"")]


def test_embedder_foreign_function(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick call_foreign_function s:echo s:abc\n")
    run.foreign_functions["echo"] = lambda plugin, args: args[::-1]
    run.tick()
    assert run.one("tick", "call_foreign_function").out == b"cba"


def test_on_foreign_function(make) -> None:  # type: ignore[no-untyped-def]
    run = make("foreign_function get_buffer_bytes 8 0 100\ntick get_buffer_bytes 8 0 100\n")
    run.call_foreign_function(7, b"xyz")
    run.tick()
    assert run.enters("foreign_function") == [("foreign_function", (1, 7, 3))]
    assert run.one("foreign_function", "get_buffer_bytes").out == b"xyz"
    assert run.one("tick", "get_buffer_bytes").status == NOT_FOUND
