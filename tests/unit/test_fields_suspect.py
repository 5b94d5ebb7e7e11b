"""serde.fields_suspect: the runtime's cheap test that marks a stream whose plugin wrote a
header field an HTTP/1 codec may refuse (the gateway then validates its heads in full). It
must never miss one; a false alarm only costs the full check."""

from __future__ import annotations

import pytest

from wasmgate.runtime.serde import fields_suspect


@pytest.mark.parametrize(("pairs", "suspect"), [
    ([(b":method", b"GET"), (b":path", b"/a?b=1"), (b"host", b"x"), (b"x-a", b"v v\t")],
     False),
    ([(b":status", b"200"), (b"set-cookie", b"a=b; Path=/")], False),
    ([], False),
    ([(b"x-a", b"v\r\nx-injected: y")], True),
    ([(b"x-a", b"v\n")], True),
    ([(b"x-a", b"v\0")], True),
    ([(b"x a", b"v")], True),
    ([(b"x-a\nset-cookie", b"evil")], True),  # an LF inside a name (a review found it)
    ([(b"a\n:b", b"v")], True),
    ([(b"x:a", b"v")], True),  # a colon inside a name would move the name/value split
    ([(b"::path", b"/")], True),
    ([(b"", b"v")], True),
    ([(b"a", b"v"), (b"", b"v")], True),
    ([(b"x\xe9", b"v")], True),
    ([(b":path", b"/a b")], True),  # a space in the request line
    ([(b":method", b"GET\x7f")], True),
    ([(b":path", b"")], True),
])
def test_suspect_fields(pairs: list[tuple[bytes, bytes]], suspect: bool) -> None:
    assert fields_suspect(pairs) is suspect
