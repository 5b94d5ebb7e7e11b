"""Access log formats: Envoy's grammar (what is refused, and where), and the lines rendered."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import sys
import threading
from pathlib import Path

import pytest

from wasmgate.api.access_log import (
    ISTIO_TEXT_FORMAT,
    FormatError,
    Operator,
    parse_format,
    parse_json_format,
)
from wasmgate.gateway.access_log import (
    MAX_RELAYED_BATCH,
    AccessLogFormat,
    AccessLogWriter,
    AccessRecord,
    Relay,
)

RECORD = AccessRecord(
    start_time=1795521600.25,  # 2026-11-24T12:00:00.250Z
    duration=0.0123,
    protocol="HTTP/1.1",
    request_headers=[(b":method", b"POST"), (b":path", b"/v1/chat/completions"),
                     (b":authority", b"api.local"), (b"user-agent", b"curl/8"),
                     (b"x-request-id", b"rid-1"), (b"x-forwarded-for", b"10.0.0.9")],
    response_headers=[(b":status", b"200"), (b"content-type", b"application/json")],
    response_trailers=[(b"grpc-status", b"0")],
    status=200,
    bytes_received=42,
    bytes_sent=1234,
    upstream_host="127.0.0.1:9000",
    upstream_cluster="llm",
    route_name="chat",
    downstream_remote=("127.0.0.1", 50000),
    downstream_local=("127.0.0.1", 8080),
    filter_state={b"ai_log": b'{"model":"qwen","input_token":7}'},
)


def test_operators_and_literals_are_parsed_once() -> None:
    assert parse_format('a %REQ(X-A?:PATH):10% "%RESPONSE_CODE%"') == (
        "a ", Operator("REQ", "x-a", 10, ":path"), ' "', Operator("RESPONSE_CODE"), '"')
    assert parse_format("%FILTER_STATE(wasm.ai_log:PLAIN)%") == (
        Operator("FILTER_STATE", "wasm.ai_log", serialization="PLAIN"),)
    assert parse_format("%START_TIME(%s)%") == (Operator("START_TIME", "%s"),)
    assert sum(isinstance(p, Operator) for p in parse_format(ISTIO_TEXT_FORMAT)) == 24


@pytest.mark.parametrize(("text", "reason"), [
    ("%FOO%", "%FOO% at position 0: not an operator wasmgate provides"),
    ("100%", "at position 3: '%' does not start a command operator"),
    ("%REQ%", "%REQ% at position 0: needs an argument"),
    ("%REQ(a?b?c)%", "the argument is HEADER or HEADER?ALTERNATIVE"),
    ("%REQ(a?)%", "the argument is HEADER or HEADER?ALTERNATIVE"),
    ("%DURATION(x)%", "%DURATION% at position 0: takes no argument"),
    ("%DURATION:3%", "only REQ, RESP, TRAILER and FILTER_STATE take a :LENGTH"),
    ("%FILTER_STATE(k:RAW)%", "the argument is KEY, KEY:PLAIN or KEY:TYPED"),
])
def test_bad_formats_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(FormatError, match=re.escape(reason)):
        parse_format(text)


def test_a_bad_json_format_names_its_key() -> None:
    with pytest.raises(FormatError, match=r"^upstream\.host: %NOPE%"):
        parse_json_format({"code": "%RESPONSE_CODE%", "upstream": {"host": "%NOPE%"}})
    with pytest.raises(FormatError, match="a value is a string, number"):
        parse_json_format({"k": ["%RESPONSE_CODE%"]})


def test_istio_default_text_line() -> None:
    line = AccessLogFormat().render(RECORD)
    assert line == (
        '[2026-11-24T12:00:00.250Z] "POST /v1/chat/completions HTTP/1.1" 200 - via_upstream - '
        '"-" 42 1234 12 - "10.0.0.9" "curl/8" "rid-1" "api.local" "127.0.0.1:9000" llm - '
        "127.0.0.1:8080 127.0.0.1:50000 - chat")


def test_headers_alternatives_truncation_and_filter_state() -> None:
    fmt = AccessLogFormat("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH):8% %RESP(content-type)% "
                          "%TRAILER(grpc-status)% %REQ(x-missing)% "
                          "%FILTER_STATE(wasm.ai_log:PLAIN)% %FILTER_STATE(wasm.ai_log:TYPED):9% "
                          "%FILTER_STATE(wasm.none)% %FILTER_STATE(envoy.other)%")
    assert fmt.render(RECORD) == ('/v1/chat application/json 0 - '
                                  '{"model":"qwen","input_token":7} {"@type": - -')


def test_json_lines_keep_types_and_nulls() -> None:
    fmt = AccessLogFormat(json_format=parse_json_format({
        "code": "%RESPONSE_CODE%", "bytes": "%BYTES_SENT%", "ai_log":
        "%FILTER_STATE(wasm.ai_log:PLAIN)%", "tls": "%REQUESTED_SERVER_NAME%",
        "line": "%REQ(:METHOD)% %REQ(:PATH)%", "fixed": 1,
        "nested": {"flags": "%RESPONSE_FLAGS%"}}))
    assert json.loads(fmt.render(RECORD)) == {
        "code": 200, "bytes": 1234, "ai_log": '{"model":"qwen","input_token":7}', "tls": None,
        "line": "POST /v1/chat/completions", "fixed": 1, "nested": {"flags": "-"}}


def test_failures_get_envoy_response_flags_and_details() -> None:
    fmt = AccessLogFormat("%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%")
    cases = {"upstream_reset_before_response_started{connection_failure}": "503 UF",
             "upstream_response_timeout": "504 UT", "route_not_found": "404 NR",
             "downstream_remote_disconnect": "0 DC", "wasm_fail_stream": "503 -"}
    for details, start in cases.items():
        status = int(start.split()[0])
        record = AccessRecord(0.0, 0.0, "HTTP/1.1", [], status=status, details=details)
        assert fmt.render(record) == f"{start} {details}"


def test_start_time_with_a_pattern() -> None:
    fmt = AccessLogFormat("%START_TIME(%Y/%m/%d %H:%M:%E3S)% %START_TIME(%s)%")
    assert fmt.render(RECORD) == "2026/11/24 12:00:00.250 1795521600"


def test_a_value_with_a_newline_stays_on_one_line() -> None:
    record = AccessRecord(0.0, 0.0, "HTTP/1.1", [], filter_state={b"k": b"a\nb\rc"})
    assert AccessLogFormat("%FILTER_STATE(wasm.k:PLAIN)%").render(record) == "a\\nb\\rc"


def test_file_writer_appends_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text("earlier\n")
    writer = AccessLogWriter(str(path))
    lines = [f"line {i} " + "x" * 100 for i in range(100)]  # > PIPE_BUF in all
    for line in lines:
        writer.write(line)  # no running loop: written at once
    writer.close()
    assert path.read_text().splitlines() == ["earlier", *lines]
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_format_text_is_never_code() -> None:
    """A text format is compiled to a function; its literals and arguments stay data."""
    literal = "'''\"\"\" {r} \\n \\\\ ) ; __import__('os') "
    fmt = AccessLogFormat(literal + "%RESPONSE_CODE% %REQ(x'; y = (\"):3%")
    record = AccessRecord(0.0, 0.0, "HTTP/1.1", [(b"x'; y = (\"", b"value")], status=204)
    assert fmt.render(record) == literal + "204 val"


def test_pipe_writer_writes_whole_lines_of_at_most_pipe_buf() -> None:
    """To a pipe (stdout under a supervisor) a flush is whole lines in writes of at most
    PIPE_BUF bytes, unless one line alone is longer: the writes of several workers sharing
    the pipe never split a line."""
    writes: list[bytes] = []

    class Recording(AccessLogWriter):
        def _write_all(self, data: bytes) -> None:
            writes.append(data)
            super()._write_all(data)

    read_end, write_end = os.pipe()
    lines = [f"{i} " + "y" * 1000 for i in range(30)] + ["long " + "z" * 5000, "last"]

    async def log_all() -> None:
        writer = Recording(f"/dev/fd/{write_end}")
        for line in lines:
            writer.write(line)  # buffered: the loop is running
        assert writes == []
        writer.close()  # flushes

    try:
        asyncio.run(log_all())
        os.close(write_end)
        data = b""
        while chunk := os.read(read_end, 1 << 16):
            data += chunk
    finally:
        os.close(read_end)
    assert data.decode().splitlines() == lines
    assert all(w.endswith(b"\n") for w in writes)
    assert [w for w in writes if len(w) > 4096] == [("long " + "z" * 5000 + "\n").encode()]
    # as few writes as the limit allows: no two neighbours would have fitted in one
    assert all(len(a) + len(b) > 4096 for a, b in itertools.pairwise(writes))
    assert len(writes) >= 9  # 30 lines of ~1 KB: 4 to a write; the long one; "last"


def test_envoy_and_istio_details_of_the_language() -> None:
    record = dataclasses.replace(RECORD, start_time=1795521600.9996,
                                 details="upstream_reset_after_response_started"
                                         "{connection_termination}")
    # %% is a literal %; Istio's newline at the end of a format is not doubled
    assert AccessLogFormat("100%% %RESPONSE_CODE%\n").render(record) == "100% 200"
    # fractions are truncated, never rounded into the next second; %f / %3f as Envoy's
    assert AccessLogFormat("%START_TIME(%H:%M:%E3S)% %START_TIME(%s.%3f)%").render(
        record) == "12:00:00.999 1795521600.999"
    assert AccessLogFormat("%START_TIME(%f)%").render(
        dataclasses.replace(RECORD, start_time=1795521600.75)) == "750000000"
    # an HTTP/1 upstream connection lost mid-response: UC (the reset reason)
    assert AccessLogFormat("%RESPONSE_FLAGS%").render(record) == "UC"
    assert AccessLogFormat("%UPSTREAM_CLUSTER_RAW%").render(record) == "llm"


def test_typed_filter_state_is_envoys_bytes_value() -> None:
    """Envoy keeps a proxy_set_property value as bytes: TYPED prints the BytesValue Any, an
    object in a JSON format, its JSON text in a text format."""
    typed = {"@type": "type.googleapis.com/google.protobuf.BytesValue",
             "value": base64.b64encode(b'{"model":"qwen","input_token":7}').decode()}
    assert json.loads(AccessLogFormat("%FILTER_STATE(wasm.ai_log)%").render(RECORD)) == typed
    line = AccessLogFormat(json_format=parse_json_format(
        {"fs": "%FILTER_STATE(wasm.ai_log:TYPED)%", "flags": "%RESPONSE_FLAGS%"})).render(RECORD)
    assert json.loads(line) == {"fs": typed, "flags": "-"}  # (flags: a string, as Envoy's)


def test_a_local_reply_is_never_via_upstream() -> None:
    fmt = AccessLogFormat("%RESPONSE_CODE% %RESPONSE_CODE_DETAILS%")
    assert fmt.render(dataclasses.replace(RECORD, status=403, local_reply=True)) == "403 -"
    assert fmt.render(RECORD) == "200 via_upstream"


def test_a_reader_that_stops_reading_never_blocks_the_caller(tmp_path: Path) -> None:
    """A full pipe (a paused `| less`, a stuck log shipper) blocks the writer thread only:
    write() returns; what does not fit in the backlog is dropped and counted."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read
    counted: list[int] = []
    writer = AccessLogWriter(str(fifo), on_drop=counted.append)
    writer.MAX_BACKLOG_BYTES = 256 << 10
    try:
        for i in range(20000):  # ~2 MiB: far past the pipe's 64 KiB and the backlog
            writer.write(f"line {i} " + "x" * 100)  # (no loop: each handed over at once)
        assert writer.dropped > 0 and sum(counted) == writer.dropped  # (the gateway's metric)
    finally:
        os.close(reader)  # the blocked write fails (EPIPE): the thread ends its work
        writer.close(timeout=5)


def test_closed_stdout_is_an_error_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", None)  # what Python has when fd 1 was closed
    with pytest.raises(OSError, match="/dev/stdout is closed"):
        AccessLogWriter("/dev/stdout")


def test_two_writers_sharing_a_relay_send_whole_batches() -> None:
    """A worker's writers share its relay to the parent (two while a reload moves the log
    between pipes): each batch arrives whole, never interleaved with another (a review saw
    mixed bytes and a corrupt length before the relay had its lock)."""
    reader, sender = multiprocessing.get_context("spawn").Pipe(duplex=False)
    pipes = [os.pipe() for _ in range(2)]  # two non-regular paths (nothing is written there)
    relay = Relay(sender)
    writers = [AccessLogWriter(f"/dev/fd/{w}", relay) for _, w in pipes]
    paths = [f"/dev/fd/{w}".encode() for _, w in pipes]
    lines = [b"a" * 5000, b"b" * 5000]
    batches = 100
    received: list[bytes] = []

    def consume() -> None:
        while len(received) < 2 * batches and reader.poll(10):
            received.append(reader.recv_bytes(MAX_RELAYED_BATCH))

    consumer = threading.Thread(target=consume)
    consumer.start()

    def produce(i: int) -> None:
        for _ in range(batches):  # 40 KB a batch: more than one pipe write each
            writers[i].write_batch((lines[i] + b"\n") * 8, 8)

    producers = [threading.Thread(target=produce, args=(i,)) for i in range(2)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join()
    consumer.join(30)
    for writer in writers:
        writer.close()
    for r, w in pipes:
        os.close(r)
        os.close(w)
    assert len(received) == 2 * batches
    for message in received:
        path, _, data = message.partition(b"\0")
        assert data == (lines[paths.index(path)] + b"\n") * 8
