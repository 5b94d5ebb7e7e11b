"""What a filter chain asks its server to do: the chain's output vocabulary.

Request-direction data goes upstream (`Forward*`); response-direction data goes to the client
(`Send*`). A local reply arrives as `Send*` actions like any response, after the response
callbacks of the plugins before the one that sent it. `Reset` ends the stream abruptly.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime.serde import Pairs


@dataclass(frozen=True)
class ForwardHeaders:
    headers: Pairs
    end_of_stream: bool


@dataclass(frozen=True)
class ForwardBody:
    data: bytes
    end_of_stream: bool


@dataclass(frozen=True)
class ForwardTrailers:
    trailers: Pairs


@dataclass(frozen=True)
class SendHeaders:
    headers: Pairs
    end_of_stream: bool
    details: str = ""  # Envoy's response code details (local replies)


@dataclass(frozen=True)
class SendBody:
    data: bytes
    end_of_stream: bool


@dataclass(frozen=True)
class SendTrailers:
    trailers: Pairs


@dataclass(frozen=True)
class Reset:
    details: str


ChainAction = (ForwardHeaders | ForwardBody | ForwardTrailers | SendHeaders | SendBody
               | SendTrailers | Reset)
