"""Upstream writes: grouped at the end of the loop iteration while several connections write
in one iteration, sent at once while requests come one at a time, always in order."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from wasmgate.gateway.upstream import Endpoint, EndpointPool, UpstreamConnection, _LoopWrites


class Recorder(asyncio.Transport):
    def __init__(self, log: list[tuple[str, bytes]], name: str) -> None:
        super().__init__()
        self.log, self.name = log, name

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.log.append((self.name, bytes(data)))

    def is_closing(self) -> bool:
        return False


def connections(log: list[tuple[str, bytes]], n: int) -> list[UpstreamConnection]:
    pool = EndpointPool(Endpoint("127.0.0.1", 1))
    out = []
    for i in range(n):
        connection = UpstreamConnection(pool)
        connection.connection_made(Recorder(log, f"c{i}"))
        out.append(connection)
    return out


def run(main: object) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)  # type: ignore[arg-type]


def test_writes_of_one_iteration_leave_together_in_order() -> None:
    async def main() -> None:
        log: list[tuple[str, bytes]] = []
        a, b = connections(log, 2)
        a.write(b"head-a")
        b.write(b"head-b")
        a.write(b"body-a")
        assert log == []  # nothing before the iteration ends
        await asyncio.sleep(0)
        assert log == [("c0", b"head-abody-a"), ("c1", b"head-b")]

    run(main())


def test_single_writers_go_direct_and_a_burst_groups_them_again() -> None:
    async def main() -> None:
        log: list[tuple[str, bytes]] = []
        a, b, c = connections(log, 3)
        for i in range(_LoopWrites.DIRECT_AFTER):  # one request per iteration
            a.write(b"%d" % i)
            await asyncio.sleep(0)
        writes = a._writes
        assert not writes.deferring
        log.clear()
        a.write(b"now")
        assert log == [("c0", b"now")]  # written at once: no callback per request
        # Many clients again: the next probe sees enough writers in one iteration.
        for _ in range(_LoopWrites.PROBE_EVERY):
            a.write(b"x")
            b.write(b"y")
            c.write(b"z")
            await asyncio.sleep(0)
            if writes.deferring:
                break
        assert writes.deferring
        log.clear()
        a.write(b"1")
        b.write(b"2")
        a.write(b"3")
        assert log == []
        await asyncio.sleep(0)
        assert log == [("c0", b"13"), ("c1", b"2")]

    run(main())


def test_a_closed_connection_sends_nothing_it_deferred() -> None:
    async def main() -> None:
        log: list[tuple[str, bytes]] = []
        [a] = connections(log, 1)
        a.write(b"late")
        a.closed = True  # (the upstream went away within the iteration)
        await asyncio.sleep(0)
        assert log == []

    run(main())


def test_a_group_leaves_early_once_its_first_write_waited_long_enough(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first request's head never waits for a whole iteration of plugin work."""
    async def main() -> None:
        log: list[tuple[str, bytes]] = []
        a, b, c = connections(log, 3)
        a.write(b"a")
        time.sleep(0.002)  # (a plugin's work on the next requests)
        monkeypatch.setattr(_LoopWrites, "MAX_WAIT", 0.001)
        b.write(b"b")
        assert log == [("c0", b"a"), ("c1", b"b")]
        c.write(b"c")  # a new group: at the end of the iteration
        assert len(log) == 2
        await asyncio.sleep(0)
        assert log[-1] == ("c2", b"c")
        assert a._writes.small == 0  # three writers in that iteration: worth grouping

    run(main())
