"""HTTP/1.1 message heads and body framing, shared by the downstream server and upstream pool.

Hand-written because the proxy needs per-event control (headers, each body chunk, trailers)
on both sides with no extra copies; httptools does the parsing, this module only serializes.

Nothing malformed reaches the wire. Plugins may set any header name, value, `:method`,
`:path`, `:status` or trailer, often from client input (a URL-decoded query parameter copied
into a header, say), so every head is checked where it is serialized (RFC 9110 5.5: CR, LF
or NUL in a field value must be rejected or replaced by SP before forwarding):

- A request head (to the upstream, or an http_call's) with CR, LF or NUL anywhere, a header
  name that is not an RFC 9110 token, a `:method` that is not a token or a `:path` with a
  space or control byte is not sent: the stream gets Envoy's answer, a 503 local reply
  ``invalid header value for: <name>`` (``invalid header name: ...``) with details
  ``filter_removed_required_request_headers{...}`` (Envoy's router, when the codec's
  `checkValidRequestHeaders` refuses what a filter left); an http_call gets that 503 as its
  response.
- A response head with the same faults, or a `:status` that is not a final 3-digit status,
  is not sent either: the client gets a plain 502 and the connection closes (Envoy answers
  a filter-broken `:status` with a 502 local reply; its codec only asserts on values).
- A trailer with an invalid name or value is dropped (trailers are optional metadata; the
  body before them is already on the wire).

Rejecting rather than replacing by SP keeps one rule for values, names and the request line
(names and request-targets have no safe replacement). The check is cheap where it runs:
a head of n CRLF-joined lines must hold exactly 2n bytes that are CR, LF or NUL (one
`bytes.translate` over the joined bytes); only a mismatch runs the slow per-header pass that
names the culprit. Names are checked with one `bytes.translate` over all of them. It runs on every
head a plugin could have touched (any stream with plugins, every http_call); a head built
with no plugin on the stream holds only bytes httptools accepted from the wire (it refuses
CR, LF, NUL and other controls in values, non-token names, spaces and controls in the
target) and the gateway's own (x-forwarded-for, x-request-id, framing), so the no-plugin
path skips the scan (it cost ~1.5 us of ~12 us per request there).

Framing is enforced too: a body sent with a content-length never exceeds it (the excess would
be a second message to the peer) and a short one is reported (`Framing.mismatch`) so the
connection is not reused; only `chunked` is a transfer-coding the gateway speaks.
"""

from __future__ import annotations

from http import HTTPStatus

from ..runtime.serde import Pairs

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                        b"te", b"upgrade", b"trailer", b"proxy-authenticate",
                        b"proxy-authorization"})
_SPECIAL = HOP_BY_HOP | {b"content-length"}
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
# RFC 9110 5.6.2 tchar: what `bytes.translate(None, _TCHAR)` deletes from a valid token
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# request-target bytes: visible ASCII and obs-text; no SP, no control byte
_TARGET = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))


class InvalidHead(ValueError):
    """A head that must not be serialized; the message is Envoy's wording."""


def is_token(name: bytes) -> bool:
    return bool(name) and not name.translate(None, _TCHAR)


def names_are_tokens(headers: Pairs) -> bool:
    """Every header name is an RFC 9110 token (one C-speed pass over all of them)."""
    names = [pair[0] for pair in headers]
    return all(names) and not b"".join(names).translate(None, _TCHAR)


def head_is_clean(head: bytes, lines: int) -> bool:
    """`head` was built by CRLF-joining `lines` items, the last one b"\\r\\n": it holds
    `lines` CRs and `lines` LFs of its own, so exactly 2 * `lines` CR, LF or NUL bytes means
    no line holds one (one C pass; ~3x cheaper than counting each byte separately)."""
    return len(head) - len(head.translate(None, CRLFNUL)) == 2 * lines


CRLFNUL = b"\r\n\0"


def _escaped(name: bytes) -> str:
    return name.decode("latin-1").encode("unicode_escape").decode("ascii")


def head_problem(headers: Pairs, method: bytes | None = None,
                 target: bytes | None = None) -> str | None:
    """The slow pass: what is wrong with a head, in Envoy's words (None: nothing)."""
    if method is not None and not is_token(method):
        return "invalid header value for: :method"
    if target is not None and not is_target(target):
        return "invalid header value for: :path"
    for key, value in headers:
        if not is_token(key):
            return f"invalid header name: {_escaped(key)}"
        if b"\r" in value or b"\n" in value or b"\0" in value:
            return f"invalid header value for: {_escaped(key)}"
    return None


def is_target(target: bytes) -> bool:
    """A request-target with no space or control byte (what a request line can carry)."""
    return bool(target) and not target.translate(None, _TARGET)


def valid_field(name: bytes, value: bytes) -> bool:
    return is_token(name) and b"\r" not in value and b"\n" not in value and b"\0" not in value


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
    """How a body is delimited on the wire: by length, chunked, or (no body) not at all.

    With a length, `encode` never emits more than it (the excess is dropped) and an end of
    stream short of it is noted: either sets `mismatch`, and the connection the message went
    on must not carry another one."""

    __slots__ = ("chunked", "length", "mismatch", "remaining")

    def __init__(self, chunked: bool, length: int | None) -> None:
        self.chunked = chunked
        self.length = self.remaining = length
        self.mismatch = False

    def encode(self, data: bytes, end_of_stream: bool, trailers: Pairs | None = None) -> bytes:
        if not self.chunked:
            remaining = self.remaining
            if remaining is not None:
                if len(data) > remaining:
                    data = data[:remaining]
                    self.mismatch = True
                remaining = self.remaining = remaining - len(data)
                if end_of_stream and remaining:
                    self.mismatch = True
            return data
        out = b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        if end_of_stream:
            tail = b"".join(k + b": " + v + b"\r\n" for k, v in trailers or ()
                            if valid_field(k, v) and k[:1] != b":")
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
    """A request head; raises `InvalidHead` rather than serialize anything malformed."""
    lines = [method + b" " + target + b" HTTP/1.1"]
    lines += [k + b": " + v for k, v in headers]  # (a list: no generator frame per line)
    lines.append(b"\r\n")
    head = b"\r\n".join(lines)
    if not (head_is_clean(head, len(lines)) and names_are_tokens(headers)
            and is_token(method) and is_target(target)):
        raise InvalidHead(head_problem(headers, method, target) or "invalid request head")
    return head


def response_head(status: int, headers: Pairs, version: bytes = b"1.1",
                  check: bool = True) -> bytes:
    """A response head; raises `InvalidHead` rather than serialize a CR, LF or NUL of a
    field (`check=False`: the caller knows every byte is clean, see server.py)."""
    lines = [_STATUS_LINES.get((status, version)) or _status_line(status, version)]
    lines += [k + b": " + v for k, v in headers]
    lines.append(b"\r\n")
    head = b"\r\n".join(lines)
    if check and not head_is_clean(head, len(lines)):
        raise InvalidHead(head_problem(headers) or "invalid response head")
    return head


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
    cannot have a body), so a keep-alive client does not wait for a close. A 1xx or 204
    response loses any content-length (RFC 9110 8.6), as does one whose content-length is
    not a number (it is re-framed); only the first content-length is kept. A `:status`
    that is not three digits gives status 0 (the caller refuses the head).
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
                if length is None:  # one content-length line: the first
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
        status = int(status_raw) if len(status_raw) == 3 and status_raw.isdigit() else 0
    no_body = status in (204, 304) or status < 200
    if length is not None and (status == 204 or status < 200 or not length.isdigit()):
        out = [(k, v) for k, v in out if k != b"content-length"]
        length = None
    if length is not None:
        return status, out, Framing(False, int(length))
    if eos or head_request or no_body:
        if not no_body and not head_request:
            out.append((b"content-length", b"0"))
        return status, out, Framing(False, 0)
    out.append((b"transfer-encoding", b"chunked"))
    return status, out, Framing(True, None)
