"""HTTP/1.1 message heads and body framing, shared by the downstream server and upstream pool.

Hand-written because the proxy needs per-event control (headers, each body chunk, trailers)
on both sides with no extra copies; httptools does the parsing, this module only serializes.
"""

from __future__ import annotations

from http import HTTPStatus

from ..runtime.serde import Pairs

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                        b"te", b"upgrade", b"trailer", b"proxy-authenticate",
                        b"proxy-authorization"})
_SPECIAL = HOP_BY_HOP | {b"content-length"}
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def header_value(headers: Pairs, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def strip_hop_by_hop(headers: Pairs) -> Pairs:
    named = header_value(headers, b"connection") or b""
    extra = {token.strip().lower() for token in named.split(b",") if token.strip()}
    return [(k, v) for k, v in headers
            if k not in HOP_BY_HOP and k not in extra and not k.startswith(b":")]


class Framing:
    """How a body is delimited on the wire: by length, chunked, or (no body) not at all."""

    __slots__ = ("chunked", "length")

    def __init__(self, chunked: bool, length: int | None) -> None:
        self.chunked = chunked
        self.length = length

    def encode(self, data: bytes, end_of_stream: bool, trailers: Pairs | None = None) -> bytes:
        if not self.chunked:
            return data
        out = b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        if end_of_stream:
            tail = b"".join(k + b": " + v + b"\r\n" for k, v in trailers or ())
            out += b"0\r\n" + tail + b"\r\n"
        return out


def choose_framing(headers: Pairs, end_of_stream: bool) -> tuple[Pairs, Framing]:
    """Keep a given content-length; else chunked when a body follows; else no body."""
    length = header_value(headers, b"content-length")
    if length is not None and length.isdigit():
        return headers, Framing(False, int(length))
    if end_of_stream:
        return headers, Framing(False, 0)
    return [*headers, (b"transfer-encoding", b"chunked")], Framing(True, None)


def request_head(method: bytes, target: bytes, headers: Pairs) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1"]
    lines += [k + b": " + v for k, v in headers]  # (a list: no generator frame per line)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def response_head(status: int, headers: Pairs, version: bytes = b"1.1") -> bytes:
    lines = [_STATUS_LINES.get((status, version)) or _status_line(status, version)]
    lines += [k + b": " + v for k, v in headers]
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def _status_line(status: int, version: bytes) -> bytes:
    line = b"HTTP/" + version + b" %d " % status + _REASONS.get(status, b"Unknown")
    if len(_STATUS_LINES) < 1024:
        _STATUS_LINES[(status, version)] = line
    return line


def simple_response(status: int, body: bytes, *, content_type: bytes = b"text/plain",
                    extra: Pairs | None = None, keep_alive: bool = True) -> bytes:
    headers: Pairs = [(b"content-type", content_type),
                      (b"content-length", str(len(body)).encode()), *(extra or [])]
    if not keep_alive:
        headers.append((b"connection", b"close"))
    return response_head(status, headers) + body


def response_headers_out(headers: Pairs, eos: bool, head_request: bool,
                         status: int | None = None) -> tuple[int, Pairs, Framing]:
    """One pass over a response's headers: status, what goes on the wire, and its framing.

    A response that ends here without a content-length gets `content-length: 0` (unless it
    cannot have a body), so a keep-alive client does not wait for a close.
    """
    status_raw = b"502"
    length: bytes | None = None
    out: Pairs = []
    append = out.append
    tokens: set[bytes] | None = None
    for pair in headers:  # (the pair itself is kept: no new tuple per header)
        key = pair[0]
        if key in _SPECIAL:
            if key == b"content-length":
                length = pair[1]
                append(pair)
            elif key == b"connection":
                value = pair[1].lower()
                # `keep-alive` names a hop-by-hop header anyway: no set to build
                tokens = None if value == b"keep-alive" else {
                    t.strip() for t in value.split(b",") if t.strip()}
        elif key[:1] == b":":
            if key == b":status":
                status_raw = pair[1]
        else:
            append(pair)
    if tokens:
        out = [(k, v) for k, v in out if k not in tokens]
    if status is None:  # from the :status pseudo-header (what plugins see and may change)
        status = int(status_raw) if status_raw.isdigit() else 502
    no_body = status in (204, 304) or 100 <= status < 200
    if length is not None and length.isdigit():
        return status, out, Framing(False, int(length))
    if eos or head_request or no_body:
        if not no_body and not head_request:
            out.append((b"content-length", b"0"))
        return status, out, Framing(False, 0)
    out.append((b"transfer-encoding", b"chunked"))
    return status, out, Framing(True, None)
