"""The access log: one line per request, in an Envoy format (text or JSON), to stdout or a file.

The format is parsed once (``api/access_log.py``) and compiled here into one function per
operator, so a line costs one call per operator and nothing is computed for streams when
the log is off. Lines are written as Envoy's file access log writes them: buffered, flushed
within a second (and at shutdown); each flush is whole lines in writes of at most PIPE_BUF
bytes, so the lines of several ``--workers`` sharing a pipe or an O_APPEND file never mix.
Values that could break a line (CR, LF in a plugin's filter state) are escaped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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


Value = str | int | None
Getter = Callable[[AccessRecord], Value]

_FLAGS = (  # details prefix -> Envoy's response flag
    ("route_not_found", "NR"),
    ("upstream_reset_before_response_started{connection_failure}", "UF"),
    ("upstream_reset_before_response_started{connection_termination}", "UC"),
    ("upstream_reset_before_response_started", "UF"),
    ("upstream_response_timeout", "UT"),
    ("upstream_reset_after_response_started", "UR"),
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


def _filter_state_getter(op: Operator) -> Getter:
    assert op.argument is not None
    # proxy_set_property values are Envoy's filter state `wasm.<key>`; there is no other kind
    key = op.argument[5:].encode() if op.argument.startswith("wasm.") else None
    limit, plain = op.max_length, op.serialization == "PLAIN"

    def get(record: AccessRecord) -> Value:
        raw = record.filter_state.get(key) if key is not None else None
        if raw is None:
            return None
        text = raw.decode("utf-8", "replace")
        if not plain:
            text = json.dumps(text)
        return text[:limit] if limit is not None else text
    return get


def _start_time_getter(op: Operator) -> Getter:
    pattern = op.argument
    if pattern is None:
        def iso(record: AccessRecord) -> Value:
            seconds = int(record.start_time)
            millis = int((record.start_time - seconds) * 1000)
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
        return iso

    def formatted(record: AccessRecord) -> Value:
        seconds = int(record.start_time)
        fraction = record.start_time - seconds
        text = pattern
        for digits in (3, 6, 9):  # Envoy's %E3S: seconds with that many decimals
            text = text.replace(f"%E{digits}S", "%S." + f"{fraction:.{digits}f}"[2:])
        text = text.replace("%s", str(seconds))
        return time.strftime(text, time.gmtime(seconds))
    return formatted


def _address(address: tuple[str, int]) -> str | None:
    host, port = address
    if not host:
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _flags(record: AccessRecord) -> Value:
    for prefix, flag in _FLAGS:
        if record.details.startswith(prefix):
            return flag
    return None


_GETTERS: dict[str, Getter] = {
    "RESPONSE_CODE": lambda r: r.status,
    "RESPONSE_CODE_DETAILS": lambda r: r.details or ("via_upstream" if r.status else None),
    "RESPONSE_FLAGS": _flags,
    "PROTOCOL": lambda r: r.protocol,
    "BYTES_RECEIVED": lambda r: r.bytes_received,
    "BYTES_SENT": lambda r: r.bytes_sent,
    "DURATION": lambda r: int(r.duration * 1000),
    "UPSTREAM_HOST": lambda r: r.upstream_host,
    "UPSTREAM_CLUSTER": lambda r: r.upstream_cluster,
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


def _compile_text(pieces: tuple[Piece, ...]) -> Callable[[AccessRecord], str]:
    parts: list[str | Getter] = [p if isinstance(p, str) else _getter(p) for p in pieces]

    def render(record: AccessRecord) -> str:
        out = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
            else:
                value = part(record)
                out.append("-" if value is None else _one_line(str(value)))
        return "".join(out)
    return render


def _compile_json(spec: object) -> Callable[[AccessRecord], object]:
    """A single operator keeps its type (numbers stay numbers, absent is null), as Envoy's
    json_format; text with several pieces is a string."""
    if isinstance(spec, dict):
        fields = [(key, _compile_json(value)) for key, value in spec.items()]
        return lambda record: {key: get(record) for key, get in fields}
    if isinstance(spec, tuple):
        if len(spec) == 1 and isinstance(spec[0], Operator):
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
            self.render = _compile_text(parse_format(text or ISTIO_TEXT_FORMAT))


class AccessLogWriter:
    """Lines to stdout, stderr or a file (opened for append), flushed within FLUSH_SECONDS."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stream: IO[str] | None = None
        if path in ("/dev/stdout", "-"):
            self._fd = sys.stdout.fileno()
            self._stream = sys.stdout  # (text already buffered there is written first)
        elif path == "/dev/stderr":
            self._fd = sys.stderr.fileno()
            self._stream = sys.stderr
        else:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._owned = self._stream is None
        self._lines: list[str] = []
        self.dropped = 0  # writes that failed (each a batch of lines)
        self._timer: asyncio.TimerHandle | None = None

    def write(self, line: str) -> None:
        self._lines.append(line)
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._lines = self._lines, []
        if not lines:
            return
        if self._stream is not None:
            self._stream.flush()
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            data = (line + "\n").encode("utf-8", "replace")
            if chunk and size + len(data) > _PIPE_BUF:
                self._write_all(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(data)
            size += len(data)
        if chunk:
            self._write_all(b"".join(chunk))

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:  # a full pipe or disk, a closed stdout: drop, never stall
            self.dropped += 1
            if self.dropped == 1:
                log.warning("access log %s: cannot write (%s); dropping lines until it can",
                            self.path, exc)

    def close(self) -> None:
        self.flush()
        if self._owned:
            os.close(self._fd)
            self._owned = False


class AccessLog:
    """A format and where its lines go."""

    def __init__(self, log_format: AccessLogFormat, writer: AccessLogWriter) -> None:
        self.format = log_format
        self.writer = writer

    def log(self, record: AccessRecord) -> None:
        self.writer.write(self.format.render(record))
