"""The access log: one line per request, in an Envoy format (text or JSON), to stdout or a file.

The format is parsed once (``api/access_log.py``) and compiled here. A text format becomes
one generated Python function (``exec``, as dataclasses generate ``__init__``) that joins the
literals and one expression per operator, with each header map looked up once per line
through a dict and the timestamp's date part formatted once per second: Istio's 24-operator
line costs a few microseconds (a closure per operator cost 13). JSON formats use one
function per field. Lines are written as Envoy's file access log writes them: buffered, flushed
within a second (and at shutdown); each flush is whole lines in writes of at most PIPE_BUF
bytes, so the lines of several ``--workers`` sharing a pipe or an O_APPEND file never mix.
Values that could break a line (CR, LF in a plugin's filter state) are escaped.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import IO

from ..api.access_log import ISTIO_TEXT_FORMAT, Operator, Piece, parse_format
from ..runtime.serde import Pairs

log = logging.getLogger("wasmgate.gateway")
FLUSH_SECONDS = 1.0
"""Envoy's default ``file_flush_interval``."""
_PIPE_BUF = 4096


@dataclass(slots=True)
class AccessRecord:
    """What the gateway knows of one finished (or aborted) request."""

    start_time: float
    """Wall-clock seconds since the epoch when the request head arrived."""
    duration: float
    protocol: str
    request_headers: Pairs
    """As the upstream got them (after the plugins), else as the client sent them."""
    response_headers: Pairs = field(default_factory=list)
    """As the client got them, ``:status`` included; empty when no response was sent."""
    response_trailers: Pairs = field(default_factory=list)
    status: int = 0
    details: str = ""
    bytes_received: int = 0
    bytes_sent: int = 0
    upstream_host: str | None = None
    upstream_cluster: str | None = None
    route_name: str | None = None
    downstream_remote: tuple[str, int] = ("", 0)
    downstream_local: tuple[str, int] = ("", 0)
    filter_state: Mapping[bytes, bytes] = field(default_factory=dict)
    """The stream's proxy_set_property values (Envoy's filter state ``wasm.<key>``)."""
    local_reply: bool = False
    """The response was made by the gateway or a plugin, not the upstream."""


Value = str | int | dict[str, str] | None
Getter = Callable[[AccessRecord], Value]

_FLAGS = (  # details prefix -> Envoy's response flag
    ("route_not_found", "NR"),
    ("upstream_reset_before_response_started{connection_failure}", "UF"),
    ("upstream_reset_before_response_started{connection_termination}", "UC"),
    ("upstream_reset_before_response_started", "UF"),
    ("upstream_response_timeout", "UT"),
    ("upstream_reset_after_response_started", "UC"),  # (HTTP/1: the connection went)
    ("downstream_remote_disconnect", "DC"),
)
_HOSTNAME = socket.gethostname()


def _header(pairs: Pairs, name: bytes) -> str | None:
    for key, value in pairs:
        if key == name:
            return value.decode("latin-1")
    return None


def _header_getter(op: Operator, of: Callable[[AccessRecord], Pairs]) -> Getter:
    assert op.argument is not None
    names = [n.encode() for n in (op.argument, op.alternative) if n]
    limit = op.max_length

    def get(record: AccessRecord) -> Value:
        pairs = of(record)
        for name in names:
            value = _header(pairs, name)
            if value is not None:
                return value[:limit] if limit is not None else value
        return None
    return get


def _filter_state_getter(op: Operator, json_value: bool = False) -> Getter:
    assert op.argument is not None
    # proxy_set_property values are Envoy's filter state `wasm.<key>`; there is no other kind
    key = op.argument[5:].encode() if op.argument.startswith("wasm.") else None
    limit, plain = op.max_length, op.serialization == "PLAIN"

    def get(record: AccessRecord) -> Value:
        raw = record.filter_state.get(key) if key is not None else None
        if raw is None:
            return None
        if not plain:  # Envoy's TYPED form of a Wasm filter state: a BytesValue proto
            typed = {"@type": "type.googleapis.com/google.protobuf.BytesValue",
                     "value": base64.b64encode(raw).decode("ascii")}
            if json_value:
                return typed
            text = json.dumps(typed, separators=(",", ":"))
        else:
            text = raw.decode("utf-8", "replace")
        return text[:limit] if limit is not None else text
    return get


_iso_second: list[object] = [None, ""]  # the last second formatted, and its text


def _iso(start_time: float) -> str:
    """Envoy's default START_TIME: 2026-11-24T12:00:00.250Z (milliseconds truncated)."""
    seconds = int(start_time)
    if seconds != _iso_second[0]:
        _iso_second[:] = [seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))]
    return f"{_iso_second[1]}.{int((start_time - seconds) * 1000):03d}Z"


def _start_time_getter(op: Operator) -> Getter:
    pattern = op.argument
    if pattern is None:
        return lambda record: _iso(record.start_time)

    def formatted(record: AccessRecord) -> Value:
        seconds = int(record.start_time)
        fraction = record.start_time - seconds
        text = pattern
        for digits in range(9, 0, -1):  # Envoy's %E3S (seconds.ddd), %3f (ddd), truncated
            decimals = f"{int(fraction * 10 ** digits):0{digits}d}"
            text = text.replace(f"%E{digits}S", "%S." + decimals).replace(f"%{digits}f",
                                                                          decimals)
        text = text.replace("%f", f"{int(fraction * 10 ** 9):09d}").replace("%s", str(seconds))
        return time.strftime(text, time.gmtime(seconds))
    return formatted


def _address(address: tuple[str, int]) -> str | None:
    host, port = address
    if not host:
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _flags(record: AccessRecord) -> Value:
    """Envoy's response flags; "-" for none, a string even in a JSON format, as Envoy's."""
    if not record.details:  # (most requests)
        return "-"
    for prefix, flag in _FLAGS:
        if record.details.startswith(prefix):
            return flag
    return "-"


_GETTERS: dict[str, Getter] = {
    "RESPONSE_CODE": lambda r: r.status,
    "RESPONSE_CODE_DETAILS": lambda r: r.details or (
        "via_upstream" if r.status and not r.local_reply else None),
    "RESPONSE_FLAGS": _flags,
    "PROTOCOL": lambda r: r.protocol,
    "BYTES_RECEIVED": lambda r: r.bytes_received,
    "BYTES_SENT": lambda r: r.bytes_sent,
    "DURATION": lambda r: int(r.duration * 1000),
    "UPSTREAM_HOST": lambda r: r.upstream_host,
    "UPSTREAM_CLUSTER": lambda r: r.upstream_cluster,
    "UPSTREAM_CLUSTER_RAW": lambda r: r.upstream_cluster,
    "ROUTE_NAME": lambda r: r.route_name,
    "DOWNSTREAM_REMOTE_ADDRESS": lambda r: _address(r.downstream_remote),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda r: r.downstream_remote[0] or None,
    "DOWNSTREAM_LOCAL_ADDRESS": lambda r: _address(r.downstream_local),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": lambda r: r.downstream_local[0] or None,
    "HOSTNAME": lambda r: _HOSTNAME,
    # what Envoy knows and wasmgate does not have: no TLS (server name, transport failure),
    # no upstream source address kept, connection-level termination details
    "UPSTREAM_LOCAL_ADDRESS": lambda r: None,
    "UPSTREAM_TRANSPORT_FAILURE_REASON": lambda r: None,
    "REQUESTED_SERVER_NAME": lambda r: None,
    "CONNECTION_TERMINATION_DETAILS": lambda r: None,
}


def _getter(op: Operator) -> Getter:
    if op.name == "REQ":
        return _header_getter(op, lambda r: r.request_headers)
    if op.name == "RESP":
        return _header_getter(op, lambda r: r.response_headers)
    if op.name == "TRAILER":
        return _header_getter(op, lambda r: r.response_trailers)
    if op.name == "FILTER_STATE":
        return _filter_state_getter(op)
    if op.name == "START_TIME":
        return _start_time_getter(op)
    return _GETTERS[op.name]


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n") if "\n" in text or "\r" in text \
        else text


_TEXT_EXPRESSIONS = {  # operators whose text is one expression over the record `r`
    "RESPONSE_CODE": "str(r.status)",
    "PROTOCOL": "r.protocol",
    "BYTES_RECEIVED": "str(r.bytes_received)",
    "BYTES_SENT": "str(r.bytes_sent)",
    "DURATION": "str(int(r.duration * 1000))",
    "UPSTREAM_HOST": "(r.upstream_host or '-')",
    "UPSTREAM_CLUSTER": "(r.upstream_cluster or '-')",
    "UPSTREAM_CLUSTER_RAW": "(r.upstream_cluster or '-')",
    "ROUTE_NAME": "(r.route_name or '-')",
    "RESPONSE_CODE_DETAILS":
        "(r.details or ('via_upstream' if r.status and not r.local_reply else '-'))",
    "RESPONSE_FLAGS": "_flags(r)",
    "DOWNSTREAM_REMOTE_ADDRESS": "(_address(r.downstream_remote) or '-')",
    "DOWNSTREAM_LOCAL_ADDRESS": "(_address(r.downstream_local) or '-')",
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": "(r.downstream_remote[0] or '-')",
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": "(r.downstream_local[0] or '-')",
}
_TEXT_CONSTANTS = {  # operators with the same text on every line
    "HOSTNAME": _HOSTNAME, "UPSTREAM_LOCAL_ADDRESS": "-", "UPSTREAM_TRANSPORT_FAILURE_REASON": "-",
    "REQUESTED_SERVER_NAME": "-", "CONNECTION_TERMINATION_DETAILS": "-",
}
_HEADER_MAPS = {"REQ": ("req", "r.request_headers"), "RESP": ("resp", "r.response_headers"),
                "TRAILER": ("trailers", "r.response_trailers")}


def _text(value: Value) -> str:
    return "-" if value is None else _one_line(str(value))


def _header_text(headers: dict[bytes, bytes], names: tuple[bytes, ...],
                 limit: int | None) -> str:
    for name in names:
        value = headers.get(name)
        if value is not None:
            text = value.decode("latin-1")
            return text[:limit] if limit is not None else text
    return "-"


def _first_values(pairs: Pairs) -> dict[bytes, bytes]:
    """Header name -> its first value (what Envoy's REQ/RESP print)."""
    return dict(reversed(pairs))


def _compile_text(pieces: tuple[Piece, ...]) -> Callable[[AccessRecord], str]:
    namespace: dict[str, object] = {"_text": _text, "_header_text": _header_text,
                                    "_first_values": _first_values, "_iso": _iso,
                                    "_flags": _flags, "_address": _address}
    maps: dict[str, str] = {}
    parts: list[str] = []
    literal = ""  # adjacent literal text (and constant operators), merged
    for i, piece in enumerate(pieces):
        if isinstance(piece, str) or piece.name in _TEXT_CONSTANTS:
            literal += piece if isinstance(piece, str) else _TEXT_CONSTANTS[piece.name]
            continue
        if literal:
            parts.append(repr(literal))
            literal = ""
        if piece.name in _TEXT_EXPRESSIONS:
            parts.append(_TEXT_EXPRESSIONS[piece.name])
        elif piece.name in _HEADER_MAPS:
            variable, source = _HEADER_MAPS[piece.name]
            maps[variable] = source
            assert piece.argument is not None
            names = tuple(n.encode() for n in (piece.argument, piece.alternative) if n)
            namespace[f"names{i}"] = names
            if len(names) == 1 and piece.max_length is None:  # inline: no call per header
                namespace[f"name{i}"] = names[0]
                parts.append(f"(v.decode('latin-1') if (v := {variable}.get(name{i})) "
                             "is not None else '-')")
            else:
                parts.append(f"_header_text({variable}, names{i}, {piece.max_length!r})")
        elif piece.name == "START_TIME" and piece.argument is None:
            parts.append("_iso(r.start_time)")
        else:
            namespace[f"get{i}"] = _getter(piece)
            parts.append(f"_text(get{i}(r))")
    if literal:
        parts.append(repr(literal))
    source = ["def render(r):"]
    source += [f"    {variable} = _first_values({of})" for variable, of in maps.items()]
    source.append(f"    return ''.join(({', '.join(parts)},))" if parts else "    return ''")
    # safe to exec: literals enter as repr(), names from the parser's fixed set, values as
    # namespace entries; nothing of the format text becomes code
    exec("\n".join(source), namespace)
    return namespace["render"]  # type: ignore[return-value]


def _compile_json(spec: object) -> Callable[[AccessRecord], object]:
    """A single operator keeps its type (numbers stay numbers, absent is null), as Envoy's
    json_format; text with several pieces is a string."""
    if isinstance(spec, dict):
        fields = [(key, _compile_json(value)) for key, value in spec.items()]
        return lambda record: {key: get(record) for key, get in fields}
    if isinstance(spec, tuple):
        if len(spec) == 1 and isinstance(spec[0], Operator):
            if spec[0].name == "FILTER_STATE":
                return _filter_state_getter(spec[0], json_value=True)
            return _getter(spec[0])
        return _compile_text(spec)
    return lambda record: spec


class AccessLogFormat:
    """A compiled format: ``render(record)`` is one line without its newline."""

    def __init__(self, text: str | None = None, json_format: object = None) -> None:
        """`json_format`: a parsed jsonFormat (``api.access_log.parse_json_format``)."""
        if json_format is not None:
            to_json = _compile_json(json_format)
            self.render: Callable[[AccessRecord], str] = lambda record: json.dumps(
                to_json(record), separators=(",", ":"), ensure_ascii=False)
        else:
            text = text or ISTIO_TEXT_FORMAT
            if text.endswith("\n"):  # Istio adds the newline only when a format has none
                text = text[:-1]
            self.render = _compile_text(parse_format(text))


class AccessLogWriter:
    """Lines to stdout, stderr or a file (opened for append).

    The event loop only buffers lines and, each FLUSH_SECONDS or FLUSH_BYTES, hands one
    encoded batch to a writer thread: a reader that stops reading (a paused `| less`, a stuck
    log shipper) or a slow disk blocks that thread, never the gateway. Batches past
    MAX_BACKLOG_BYTES waiting for the thread are dropped, counted and warned about once.
    A batch is one write to a regular file (O_APPEND: never interleaved with another
    worker's) and writes of whole lines of at most PIPE_BUF bytes to a pipe (atomic; a
    single line longer than PIPE_BUF is one write the kernel may interleave with another
    process's lines on the same pipe).

    With `--workers`, a worker is given `relay` (a pipe to the parent): its batches for a
    path that is not a regular file (stdout under Kubernetes is a pipe) go to the parent,
    which is the one process writing there (`relay_batch`), so lines of any length from
    several workers never mix."""

    FLUSH_BYTES = 64 << 10  # (Envoy's file access log buffer)
    MAX_BACKLOG_BYTES = 16 << 20

    def __init__(self, path: str, relay: Relay | None = None,
                 on_drop: Callable[[int], None] | None = None) -> None:
        """`on_drop(lines)`: told of lines dropped (the gateway counts them in its stats)."""
        self.path = path
        self._on_drop = on_drop
        self._stream: IO[str] | None = None
        if path in ("/dev/stdout", "-", "/dev/stderr"):
            stream = sys.stderr if path == "/dev/stderr" else sys.stdout
            if stream is None:
                raise OSError(errno.EBADF, f"{path} is closed")
            self._fd = stream.fileno()
            self._stream = stream  # (text already buffered there is written first)
        else:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._owned = self._stream is None
        self._whole = stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._relay = None if self._whole else relay
        self._lines: list[str] = []
        self._size = 0
        # Requests begun with this writer and not yet logged: a writer a reload dropped is
        # closed when the last of them is logged (`retire`), however long it runs.
        self.in_flight = 0
        self.retired = False
        self.dropped = 0  # lines not written (backlog full, or the write failed)
        self._warned = False
        self._timer: asyncio.TimerHandle | None = None
        self._backlog: deque[tuple[bytes, int]] = deque()
        self._backlog_bytes = 0
        self._cond = threading.Condition()
        self._closing = False
        self._reopen = False  # reopen the file before the next write (log rotation)
        self._thread: threading.Thread | None = None

    def write(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # (no event loop: written at once)
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Hand what is buffered to the writer thread."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._lines, self._size = self._lines, [], 0
        if not lines or self._closing:
            if lines:
                self._count_drop(len(lines))
            return
        lines.append("")
        self.write_batch("\n".join(lines).encode("utf-8", "replace"), len(lines) - 1)

    def write_batch(self, data: bytes, lines: int) -> None:
        """Queue `lines` whole encoded lines for the writer thread."""
        with self._cond:
            if self._closing:
                self._count_drop(lines)
                return
            if self._backlog_bytes + len(data) > self.MAX_BACKLOG_BYTES:
                self._drop(lines, "the output is not keeping up")
                return
            self._backlog.append((data, lines))
            self._backlog_bytes += len(data)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"access-log {self.path}")
                self._thread.start()
            self._cond.notify()

    def _drop(self, lines: int, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("access log %s: %s; dropping lines (wasmgate_access_log_dropped_lines"
                        "_total) until it can", self.path, why)
        self._count_drop(lines)

    def _count_drop(self, lines: int) -> None:
        self.dropped += lines
        if self._on_drop is not None:
            self._on_drop(lines)

    @property
    def owns_file(self) -> bool:
        """A file this writer opened by path (not stdout or stderr)."""
        return self._owned

    def reopen(self) -> None:
        """Open the file again by its path (after logrotate moved it; Envoy's SIGUSR1 and
        admin /reopen_logs): lines buffered so far go to the new file. stdout/stderr: no-op."""
        if not self._owned:
            return
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._reopen_now()
            else:  # between two batches of the writer thread, which owns the fd
                self._reopen = True
                self._cond.notify()

    def _reopen_now(self) -> None:
        self._reopen = False
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            log.warning("access log %s: cannot reopen (%s); still writing the old file",
                        self.path, exc)
            return
        old, self._fd = self._fd, fd
        self._whole = stat.S_ISREG(os.fstat(fd).st_mode)
        os.close(old)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._backlog and not self._closing and not self._reopen:
                    self._cond.wait()
                if self._reopen:
                    self._reopen_now()
                if not self._backlog:
                    if self._closing:  # all written: the thread owned the fd, it closes it
                        self._close_fd()
                        return
                    continue
                data, lines = self._backlog.popleft()
            try:
                if self._stream is not None:
                    self._stream.flush()
                self._write_batch(data)
            except (OSError, ValueError) as exc:  # a full disk, a closed stdout or relay
                self._drop(lines, f"cannot write ({exc})")
            with self._cond:
                self._backlog_bytes -= len(data)

    def _write_batch(self, data: bytes) -> None:
        if self._relay is not None:  # the parent writes it (see the class docstring)
            self._relay.send(self.path, data)
            return
        if self._whole:  # a regular file opened O_APPEND: one write is not interleaved
            self._write_all(data)
            return
        start = 0  # a pipe or terminal: only writes of up to PIPE_BUF bytes are atomic
        while start < len(data):
            end = len(data) if len(data) - start <= _PIPE_BUF else \
                data.rfind(b"\n", start, start + _PIPE_BUF) + 1
            if end <= start:  # one line longer than PIPE_BUF: it goes alone
                end = data.index(b"\n", start) + 1
            self._write_all(data[start:end])
            start = end

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    @property
    def closing(self) -> bool:
        return self._closing

    def retire(self) -> None:
        """No new request will use this writer: close it once the requests using it are
        logged (at once if there are none), without waiting on the event loop."""
        self.retired = True
        if self.in_flight <= 0:
            self.close(0)

    def done_with(self) -> None:
        """A request that began with this writer was logged (or will not be)."""
        self.in_flight -= 1
        if self.retired and self.in_flight <= 0:
            self.close(0)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is buffered, then stop: the writer thread ends (and closes the file)
        once its backlog is written. Waits up to `timeout` s for that (0: do not wait, as
        after a reload, on the event loop; shutdown waits)."""
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
            if thread is None:  # nothing was ever handed over: no thread owns the fd
                self._close_fd()
                return
        if timeout > 0:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("access log %s: output blocked; %d bytes not written", self.path,
                            self._backlog_bytes)

    def _close_fd(self) -> None:
        if self._owned:
            self._owned = False
            os.close(self._fd)


MAX_RELAYED_BATCH = 64 << 20
"""A relayed message is one batch; the parent refuses longer ones (a corrupt length)."""


class Relay:
    """A worker's pipe to the `--workers` parent, shared by its writers (a writer per path,
    two while a reload moves the log): one message at a time, whole."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    def send(self, path: str, data: bytes) -> None:
        message = path.encode() + b"\0" + data
        if len(message) > MAX_RELAYED_BATCH:
            raise ValueError(f"a batch of {len(message)} bytes (the parent takes up to "
                             f"{MAX_RELAYED_BATCH})")
        with self._lock:
            self._connection.send_bytes(message)


def relay_batch(writers: dict[str, AccessLogWriter], message: bytes) -> None:
    """In the `--workers` parent: write a batch a worker relayed (`path \\0 lines`)."""
    path, _, data = message.partition(b"\0")
    name = path.decode()
    writer = writers.get(name)
    if writer is None:
        try:
            writer = writers[name] = AccessLogWriter(name)
        except OSError as exc:
            log.warning("access log %s: cannot open (%s); relayed lines dropped", name, exc)
            return
    writer.write_batch(data, data.count(b"\n"))


class AccessLog:
    """A format and where its lines go."""

    def __init__(self, log_format: AccessLogFormat, writer: AccessLogWriter) -> None:
        self.format = log_format
        self.writer = writer

    def log(self, record: AccessRecord) -> None:
        self.writer.write(self.format.render(record))
