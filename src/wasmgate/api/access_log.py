"""Access log formats in Envoy's substitution language, as Istio's ``accessLogFormat`` takes them.

A format is text with command operators: ``%RESPONSE_CODE%``, ``%REQ(X-REQUEST-ID)%``,
``%REQ(X-ENVOY-ORIGINAL-PATH?:PATH):64%``, ``%FILTER_STATE(wasm.ai_log:PLAIN)%``... This module
is the grammar only (what a valid format is, parsed once into pieces); the gateway evaluates
the pieces per request (``gateway/access_log.py``). Hand-written: no Python library speaks
Envoy's format language. An operator Envoy has but wasmgate cannot fill is refused here, by
name, rather than printed as ``-`` forever.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ISTIO_TEXT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% '
    "%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% "
    "%REQUESTED_SERVER_NAME% %ROUTE_NAME%"
)
"""Istio's default text format (meshConfig.accessLogFormat unset; pilot's EnvoyTextLogFormat),
the one wasmgate uses too."""

PLAIN_OPERATORS = frozenset({
    "START_TIME", "RESPONSE_CODE", "RESPONSE_CODE_DETAILS", "RESPONSE_FLAGS", "PROTOCOL",
    "BYTES_RECEIVED", "BYTES_SENT", "DURATION", "UPSTREAM_HOST", "UPSTREAM_CLUSTER",
    "UPSTREAM_LOCAL_ADDRESS", "UPSTREAM_TRANSPORT_FAILURE_REASON", "DOWNSTREAM_REMOTE_ADDRESS",
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", "DOWNSTREAM_LOCAL_ADDRESS",
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", "REQUESTED_SERVER_NAME",
    "CONNECTION_TERMINATION_DETAILS", "ROUTE_NAME", "HOSTNAME", "UPSTREAM_CLUSTER_RAW",
})
"""Operators without an argument (START_TIME takes an optional strftime one)."""

ARGUMENT_OPERATORS = frozenset({"REQ", "RESP", "TRAILER", "FILTER_STATE", "START_TIME"})
_TRUNCATABLE = frozenset({"REQ", "RESP", "TRAILER", "FILTER_STATE"})

_COMMAND = re.compile(r"%([A-Z][A-Z0-9_]*)(?:\(([^)]*)\))?(?::(\d+))?%")


class FormatError(ValueError):
    """A format Envoy would refuse, or one using an operator wasmgate does not provide."""


@dataclass(frozen=True, slots=True)
class Operator:
    """One ``%NAME(argument):max_length%`` command."""

    name: str
    argument: str | None = None
    max_length: int | None = None
    alternative: str | None = None
    """REQ/RESP/TRAILER: the header read when the first is absent (``X?Y``)."""
    serialization: str = "TYPED"
    """FILTER_STATE: PLAIN (the stored text) or TYPED (a JSON value)."""


Piece = str | Operator


def parse_format(text: str) -> tuple[Piece, ...]:
    """The format's literal text and operators, in order (``%%`` is a literal ``%``).
    Raises FormatError."""
    pieces: list[Piece] = []
    position = 0
    while True:
        start = text.find("%", position)
        if start < 0:
            break
        if text.startswith("%%", start):
            pieces.append(text[position:start + 1])
            position = start + 2
            continue
        match = _COMMAND.match(text, start)
        if match is None:
            raise FormatError(f"at position {start}: '%' does not start a command operator "
                              "(%NAME%, %NAME(ARG)% or %NAME(ARG):LENGTH%)")
        if start > position:
            pieces.append(text[position:start])
        pieces.append(_operator(match, start))
        position = match.end()
    if position < len(text):
        pieces.append(text[position:])
    merged: list[Piece] = []  # adjacent literals (around a %%) as one
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        elif piece != "":
            merged.append(piece)
    return tuple(merged)


def _operator(match: re.Match[str], at: int) -> Operator:
    name, argument, length = match.group(1), match.group(2), match.group(3)
    where = f"%{name}% at position {at}"
    if name not in PLAIN_OPERATORS and name not in ARGUMENT_OPERATORS:
        known = ", ".join(sorted(PLAIN_OPERATORS | ARGUMENT_OPERATORS))
        raise FormatError(f"{where}: not an operator wasmgate provides (known: {known})")
    if argument is None and name in ARGUMENT_OPERATORS and name != "START_TIME":
        raise FormatError(f"{where}: needs an argument, e.g. %{name}(x-request-id)%")
    if argument is not None and name not in ARGUMENT_OPERATORS:
        raise FormatError(f"{where}: takes no argument")
    max_length = int(length) if length is not None else None
    if max_length is not None and name not in _TRUNCATABLE:
        raise FormatError(f"{where}: only REQ, RESP, TRAILER and FILTER_STATE take a :LENGTH")
    if name in ("REQ", "RESP", "TRAILER"):
        assert argument is not None
        first, separator, alternative = argument.partition("?")
        if not first or "?" in alternative or (separator and not alternative):
            raise FormatError(f"{where}: the argument is HEADER or HEADER?ALTERNATIVE")
        return Operator(name, first.lower(), max_length, alternative.lower() or None)
    if name == "FILTER_STATE":
        assert argument is not None
        key, _, serialization = argument.partition(":")
        serialization = serialization or "TYPED"
        if not key or serialization not in ("PLAIN", "TYPED"):
            raise FormatError(f"{where}: the argument is KEY, KEY:PLAIN or KEY:TYPED")
        return Operator(name, key, max_length, serialization=serialization)
    if name == "START_TIME" and argument == "":
        argument = None
    return Operator(name, argument)


def parse_json_format(value: object, path: str = "") -> object:
    """A ``jsonFormat`` object: every string value parsed as a format; nested objects, numbers,
    booleans and null kept. Raises FormatError naming the key."""
    if isinstance(value, dict):
        parsed: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise FormatError(f"{path or 'jsonFormat'}: keys are strings, not {key!r}")
            parsed[key] = parse_json_format(item, f"{path}.{key}" if path else key)
        return parsed
    if isinstance(value, str):
        try:
            return parse_format(value)
        except FormatError as exc:
            raise FormatError(f"{path}: {exc}") from None
    if value is None or isinstance(value, bool | int | float):
        return value
    raise FormatError(f"{path}: a value is a string, number, boolean, null or an object")
