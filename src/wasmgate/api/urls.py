"""Plugin URLs as Istio reads them: scheme detection, validation and resolution.

Istio's webhook parses the url with Go's ``url.ParseRequestURI`` and retries with ``http://`` in
front; istiod then gives a scheme-less url the ``oci`` scheme. Go finds a scheme in anything that
starts with a letter and reaches ``:`` before any other punctuation, so ``localhost:5000/f:v1``
has the scheme ``localhost`` and is rejected (we reject it too, with a hint), while
``10.0.0.1:5000/f:v1`` and ``ghcr.io/org/f:v1`` have none and mean OCI.
"""

from __future__ import annotations

import re
from typing import Literal, cast

Scheme = Literal["oci", "file", "http", "https"]
ALLOWED_SCHEMES: frozenset[str] = frozenset({"oci", "file", "http", "https"})
SHA256_HEX = re.compile(r"^[a-f0-9]{64}$")
_URL_DIGEST = re.compile(r"@sha256:([^/?#]*)")


def go_scheme(raw: str) -> tuple[str, str]:
    """Go's ``getScheme``: (lowercased scheme, rest), or ("", raw) when there is none."""
    for i, char in enumerate(raw):
        if char.isascii() and char.isalpha():
            continue
        if char.isascii() and (char.isdigit() or char in "+-."):
            if i == 0:
                return "", raw
            continue
        if char == ":":
            if i == 0:
                raise ValueError("missing protocol scheme")
            return raw[:i].lower(), raw[i + 1 :]
        return "", raw
    return "", raw


def check_url(raw: str) -> str:
    """Validate a WasmPlugin url; return it unchanged or raise ValueError saying why."""
    if not raw:
        raise ValueError("url must not be empty")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise ValueError("url must not contain spaces or control characters")
    scheme, rest = go_scheme(raw)
    if scheme == "":
        if raw.startswith("/"):
            raise ValueError(f"{raw!r} is a path, not an image: write file://{raw}")
        if raw.split("/", 1)[0] == "":
            raise ValueError(f"{raw!r} has no registry host")
        return raw
    if scheme not in ALLOWED_SCHEMES:
        hint = ""
        if rest[:1].isdigit():
            hint = f"; a registry with a port needs the scheme: oci://{raw}"
        raise ValueError(
            f"unsupported scheme {scheme!r} (allowed: oci, file, http, https, or none for oci)"
            + hint
        )
    if not rest.startswith("//"):
        raise ValueError(f"{raw!r}: expected {scheme}://...")
    if scheme == "file":
        if rest == "//":
            raise ValueError("file url has no path")
        return raw
    if rest[2:].split("/", 1)[0] in ("", "@"):
        raise ValueError(f"{raw!r} has no host")
    return raw


def url_scheme(raw: str) -> Scheme:
    """The effective scheme of a valid url ("oci" when none is written)."""
    scheme = go_scheme(raw)[0] or "oci"
    if scheme not in ALLOWED_SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r}")
    return cast(Scheme, scheme)


def resolve_url(raw: str) -> str:
    """The url istiod hands on: ``oci://`` added when no scheme is written, scheme lowercased."""
    scheme, rest = go_scheme(raw)
    return f"oci://{raw}" if scheme == "" else f"{scheme}:{rest}"


def url_digest(raw: str) -> str | None:
    """The hex digest after ``@sha256:`` in the url, if any (not validated)."""
    match = _URL_DIGEST.search(raw)
    return match.group(1) if match else None


def url_path(resolved: str) -> str:
    """The path of a resolved ``scheme://host/path`` url (query and fragment dropped)."""
    after = resolved.split("://", 1)[1] if "://" in resolved else resolved
    after = re.split(r"[?#]", after, maxsplit=1)[0]
    slash = after.find("/")
    return after[slash:] if slash >= 0 else ""


def file_path(resolved: str) -> str:
    """What Envoy opens for a ``file://`` url: the url minus ``file://`` (as istiod does)."""
    return resolved.removeprefix("file://")
