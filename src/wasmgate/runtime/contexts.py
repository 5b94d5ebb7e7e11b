"""Context state: what each Proxy-Wasm context id refers to, and what it can see now.

Envoy's visibility rules are kept: a header map is readable and writable while its callback
(or a pause it asked for) holds it; after the stream continued past it, reads answer
BAD_ARGUMENT and pairs come back empty; in on_log everything is readable and nothing writable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from .serde import Pairs


class Phase(Enum):
    """Where a stream is, for map/buffer availability."""

    CREATED = "created"
    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    REQUEST_TRAILERS = "request_trailers"
    RESPONSE_HEADERS = "response_headers"
    RESPONSE_BODY = "response_body"
    RESPONSE_TRAILERS = "response_trailers"
    LOG = "log"
    DONE = "done"


@dataclass
class LocalResponse:
    """A `proxy_send_local_response` (applied after the callback returns, as Envoy defers it)."""

    status: int
    body: bytes
    headers: Pairs
    details: str
    grpc_status: int | None = None


@dataclass(slots=True)
class HeaderSlot:
    """One header/trailer map and whether the plugin may see and change it right now."""

    pairs: Pairs | None = None
    readable: bool = False
    writable: bool = False
    written: bool = False
    """A plugin changed it: the embedder validates what it serializes from it."""

    def open(self, pairs: Pairs) -> None:
        self.pairs, self.readable, self.writable = pairs, True, True

    def close(self) -> None:
        self.readable = self.writable = False


@dataclass(slots=True)
class BodySlot:
    """The body bytes the current (or buffering) callback sees."""

    data: bytearray = field(default_factory=bytearray)
    readable: bool = False
    end_of_stream: bool = False


class Context:
    """Base for every context id in a VM."""

    kind = "context"

    def __init__(self, context_id: int) -> None:
        self.id = context_id
        self.deleted = False

    @property
    def is_root(self) -> bool:
        return False


class RootContext(Context):
    """One per plugin: vm_start, configure, ticks, queues, call responses."""

    kind = "root"

    def __init__(self, context_id: int) -> None:
        super().__init__(context_id)
        self.tick_period_ms = 0
        self.status: tuple[int, bytes] = (0, b"")  # proxy_get_status
        self.call_headers: HeaderSlot = HeaderSlot()
        self.call_trailers: HeaderSlot = HeaderSlot()
        self.call_body: bytes | None = None
        self.grpc_initial: HeaderSlot = HeaderSlot()
        self.grpc_trailing: HeaderSlot = HeaderSlot()
        self.grpc_message: bytes | None = None
        self.redis_response: bytes | None = None
        self.call_data: bytes | None = None  # foreign function arguments
        self.done_pending = False

    @property
    def is_root(self) -> bool:
        return True


class HttpContextState(Context):
    """One per HTTP stream: the maps and bodies the plugin sees, and what it asked for."""

    kind = "http"
    suspect_headers = False
    """A plugin's local reply carries a header field a codec may refuse (serde.fields_suspect):
    the embedder validates the reply's head (changed maps are marked on their slot)."""

    @property
    def headers_written(self) -> bool:
        """A plugin changed a header or trailer map of this stream, or replied with a
        suspect field: the embedder should validate the heads it serializes."""
        return (self.suspect_headers or self.request_headers.written
                or self.response_headers.written or self.request_trailers.written
                or self.response_trailers.written)

    def __init__(self, context_id: int, root: RootContext) -> None:
        self.id = context_id  # (Context.__init__ inlined: one per request)
        self.deleted = False
        self.root = root
        self.phase = Phase.CREATED
        self.request_headers = HeaderSlot()
        self.request_trailers = HeaderSlot()
        self.response_headers = HeaderSlot()
        self.response_trailers = HeaderSlot()
        self.request_body = BodySlot()
        self.response_body = BodySlot()
        self.local_response: LocalResponse | None = None
        self.continue_request = False
        self.continue_response = False
        self.closed = False
        self.filter_state: dict[bytes, bytes] = {}
        self._attributes: dict[str, object] | Callable[[], dict[str, object]] = {}
        self._added: dict[str, object] | None = None  # add_attribute before the first read
        self.upstream_override: bytes | None = None
        self.handle: object = None  # the HttpContext driving this state

    @property
    def attributes(self) -> dict[str, object]:
        """Attributes provided by the embedder (source.address, xds.route_name...). The
        embedder may give a function instead of a dict: it runs when a plugin first reads
        one, so streams whose plugins never ask do not pay for building them."""
        attributes = self._attributes
        if not isinstance(attributes, dict):
            attributes = self._attributes = dict(attributes())
            if self._added:
                attributes.update(self._added)
                self._added = None
        return attributes

    @attributes.setter
    def attributes(self, value: dict[str, object] | Callable[[], dict[str, object]]) -> None:
        self._attributes = value
        self._added = None

    def add_attribute(self, key: str, value: object) -> None:
        """An attribute the embedder learns mid-stream (Envoy's `upstream.address` once the
        upstream host is picked). Attributes no plugin has read yet stay unbuilt."""
        attributes = self._attributes
        if isinstance(attributes, dict):
            attributes[key] = value
        elif self._added is None:
            self._added = {key: value}
        else:
            self._added[key] = value
