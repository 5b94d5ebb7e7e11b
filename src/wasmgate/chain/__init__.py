"""The filter chain: the HTTP request lifecycle over an ordered list of plugins, with no I/O.

The same chain serves the gateway, the ASGI middleware and tests. See stream.py for the event
and action vocabulary, slots.py for failure policies and stand-ins.
"""

from __future__ import annotations

from .actions import (
    ChainAction,
    ForwardBody,
    ForwardHeaders,
    ForwardTrailers,
    Reset,
    SendBody,
    SendHeaders,
    SendTrailers,
)
from .slots import FailStrategy, PluginSlot, SlotStatus
from .stream import DEFAULT_BUFFER_LIMIT, ChainStream, StreamState


class FilterChain:
    """An ordered, immutable list of slots; a hot reload swaps the whole chain."""

    def __init__(self, slots: list[PluginSlot], *,
                 buffer_limit: int = DEFAULT_BUFFER_LIMIT) -> None:
        self.slots = list(slots)
        self.buffer_limit = buffer_limit

    def stream(self, attributes: dict[str, object] | None = None) -> ChainStream:
        return ChainStream(self.slots, attributes, buffer_limit=self.buffer_limit)

    def __len__(self) -> int:
        return len(self.slots)


__all__ = [
    "DEFAULT_BUFFER_LIMIT", "ChainAction", "ChainStream", "FailStrategy", "FilterChain",
    "ForwardBody", "ForwardHeaders", "ForwardTrailers", "PluginSlot", "Reset", "SendBody",
    "SendHeaders", "SendTrailers", "SlotStatus", "StreamState",
]
