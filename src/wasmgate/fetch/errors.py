"""Why a module could not be fetched: one exception family for every source.

Every error names what was asked for (a url or image reference) and why, so the gateway can show
it in ``/plugins``. No message ever carries a credential: auth failures name the registry and the
user name at most, never a password or token, and nothing echoes a pull secret's text.
"""

from __future__ import annotations


class FetchError(Exception):
    """A module could not be obtained; the message names the url and the reason."""


class DigestMismatch(FetchError):
    """Content whose sha256 is not the one it was pinned to or addressed by."""

    def __init__(self, subject: str, expected: str, actual: str) -> None:
        self.subject = subject
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"{subject} has digest {actual}, which does not match the expected {expected}"
        )


class AuthError(FetchError):
    """The registry refused us (401/403), or the credentials could not be read or used."""


class NotFound(FetchError):
    """No such repository, tag, manifest or blob (404)."""


class RegistryError(FetchError):
    """The registry answered with an error or something that is not the v2 protocol."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class RegistryUnreachable(RegistryError):
    """No answer at all: connection refused, DNS failure, TLS failure or timeout."""


class NotWasm(FetchError):
    """The image or download holds no Wasm module in a format we know."""


class SsrfBlocked(FetchError):
    """A registry pointed us at an address it has no business sending us to."""


__all__ = [
    "AuthError",
    "DigestMismatch",
    "FetchError",
    "NotFound",
    "NotWasm",
    "RegistryError",
    "RegistryUnreachable",
    "SsrfBlocked",
]
