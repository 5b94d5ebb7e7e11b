"""Redis for plugins (Higress ``redis_init`` / ``redis_call``): small asyncio connection pools.

A plugin hands over a complete RESP command; it is written as-is and exactly one reply is read
back and delivered unchanged (the framer below only finds where a reply ends). Each connection
carries one request at a time; a pool per (address, credentials, database) keeps a few idle.
AUTH and SELECT are sent when a connection opens. A connection whose request failed or timed out
is closed, never reused (a late reply would answer the next request).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from urllib.parse import parse_qsl

MAX_IDLE = 4
CONNECT_TIMEOUT = 5.0
_READ_SIZE = 65536


class RedisError(Exception):
    """The connection failed, timed out, or the server broke the protocol."""


# -- RESP framing --------------------------------------------------------------------------
_LINE_TYPES = frozenset(b"+-:_,#(")
"""Replies that are one line: simple string, error, integer; RESP3 null, double, bool, big."""
_BULK_TYPES = frozenset(b"$=!")
"""Length-prefixed: bulk string; RESP3 verbatim string, bulk error."""
_AGGREGATE_TYPES = {ord("*"): 1, ord(">"): 1, ord("~"): 1, ord("%"): 2, ord("|"): 2}
"""Element counts per declared length: arrays, push, set; maps and attributes have pairs."""


def reply_end(buf: bytes | bytearray, start: int = 0) -> int | None:
    """The index just past the complete RESP reply starting at ``start``; None if more bytes
    are needed. Raise RedisError for bytes that are not RESP."""
    pending = 1  # values still to skip
    pos = start
    while pending:
        if pos >= len(buf):
            return None
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        kind, header = buf[pos], bytes(buf[pos + 1:eol])
        pos = eol + 2
        pending -= 1
        if kind in _LINE_TYPES:
            continue
        try:
            length = int(header)
        except ValueError:
            raise RedisError(f"bad RESP length {header[:32]!r}") from None
        if kind in _BULK_TYPES:
            if length >= 0:
                pos += length + 2
                if pos > len(buf):
                    return None
        elif kind in _AGGREGATE_TYPES:
            if length > 0:
                pending += length * _AGGREGATE_TYPES[kind]
        else:
            raise RedisError(f"bad RESP type byte {kind!r}")
    return pos


def command(*args: str | bytes) -> bytes:
    """A RESP array of bulk strings (what AUTH/SELECT need)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


# -- targets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RedisTarget:
    """Where and how to connect; the pool key."""

    host: str
    port: int
    username: str = ""
    password: str = ""
    database: int = 0


def cluster_options(cluster: str) -> dict[str, str]:
    """The ``?k=v&...`` options of a Higress redis cluster name."""
    _, _, query = cluster.partition("?")
    return dict(parse_qsl(query, keep_blank_values=True))


def database_of(cluster: str) -> int:
    value = cluster_options(cluster).get("database", "0") or "0"
    try:
        return max(int(value), 0)
    except ValueError:
        return 0


# -- connections -----------------------------------------------------------------------------
class RedisConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = bytearray()

    @classmethod
    async def open(cls, target: RedisTarget, timeout: float) -> RedisConnection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port), timeout)
        except (OSError, TimeoutError) as exc:
            raise RedisError(f"connect to {target.host}:{target.port}: {exc}") from exc
        connection = cls(reader, writer)
        try:
            if target.password:
                auth = (command("AUTH", target.username, target.password) if target.username
                        else command("AUTH", target.password))
                await connection._setup(auth, timeout, "AUTH")
            if target.database:
                await connection._setup(command("SELECT", str(target.database)), timeout,
                                        "SELECT")
        except BaseException:
            connection.close()
            raise
        return connection

    async def _setup(self, query: bytes, timeout: float, what: str) -> None:
        reply = await self.call(query, timeout)
        if reply.startswith(b"-"):
            raise RedisError(f"{what} refused: {reply.strip().decode(errors='replace')}")

    async def call(self, query: bytes, timeout: float) -> bytes:
        """Send one command; the one raw reply."""
        try:
            async with asyncio.timeout(timeout):
                self.writer.write(query)
                await self.writer.drain()
                while True:
                    end = reply_end(self.buffer)
                    if end is not None:
                        reply = bytes(self.buffer[:end])
                        del self.buffer[:end]
                        return reply
                    data = await self.reader.read(_READ_SIZE)
                    if not data:
                        raise RedisError("connection closed by Redis")
                    self.buffer += data
        except (OSError, TimeoutError) as exc:
            raise RedisError(str(exc) or type(exc).__name__) from exc

    @property
    def usable(self) -> bool:
        return not self.buffer and not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class RedisPool:
    """Idle connections to one target; at most MAX_IDLE kept."""

    def __init__(self, target: RedisTarget) -> None:
        self.target = target
        self.idle: list[RedisConnection] = []

    async def call(self, query: bytes, timeout: float) -> bytes:
        connection = None
        while self.idle and connection is None:
            candidate = self.idle.pop()
            if candidate.usable:
                connection = candidate
            else:
                candidate.close()
        if connection is None:
            connection = await RedisConnection.open(self.target, min(timeout, CONNECT_TIMEOUT))
        try:
            reply = await connection.call(query, timeout)
        except BaseException:
            connection.close()
            raise
        if connection.usable and len(self.idle) < MAX_IDLE:
            self.idle.append(connection)
        else:
            connection.close()
        return reply

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


class RedisPools:
    """One pool per target, shared by every plugin of the process."""

    def __init__(self) -> None:
        self.pools: dict[RedisTarget, RedisPool] = {}

    async def call(self, target: RedisTarget, query: bytes, timeout: float) -> bytes:
        pool = self.pools.get(target)
        if pool is None:
            pool = self.pools[target] = RedisPool(target)
        return await pool.call(query, timeout)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
