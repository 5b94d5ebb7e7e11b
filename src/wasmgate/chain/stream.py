"""One HTTP stream through an ordered list of plugin slots, with no I/O.

Events go in (`request_headers`, `request_body`, ..., `response_trailers`, `complete`);
actions come out of `take_actions()`. Request data flows through the slots in order, response
data in reverse, as Envoy's decoder and encoder filters. A plugin that pauses holds only this
stream; when it resumes later (its http_call answered, say), `on_wakeup` is called and the
server calls `take_actions()` again.

Re-framing: whenever headers leave together with the complete body, content-length is set
to the body's real length (a plugin may have rewritten it); otherwise framing is left to the
server (a removed content-length means chunked).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from time import perf_counter

from ..runtime.abi import Action
from ..runtime.errors import PluginFailed, PluginTrap
from ..runtime.http import Attributes, HttpContext, Released
from ..runtime.serde import Pairs, normalize_headers
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
from .slots import FailStrategy, PluginSlot

DEFAULT_BUFFER_LIMIT = 1 << 20


class StreamState(Enum):
    OPEN = "open"
    LOCAL_REPLY = "local_reply"
    RESET = "reset"
    DONE = "done"


class _Filter:
    """One slot's participation in this stream."""

    __slots__ = ("context", "mode", "slot")

    def __init__(self, slot: PluginSlot, attributes: Attributes,
                 filter_state: dict[bytes, bytes]) -> None:
        self.slot = slot
        self.mode = slot.stand_in()  # None = run the plugin
        self.context: HttpContext | None = None
        if self.mode is None:
            assert slot.plugin is not None
            self.context = slot.plugin.new_http_context(attributes, filter_state)
            slot.streams += 1


_OPEN = StreamState.OPEN
_RESET = StreamState.RESET


class ChainStream:
    def __init__(self, slots: list[PluginSlot], attributes: Attributes | None = None,
                 *, buffer_limit: int = DEFAULT_BUFFER_LIMIT) -> None:
        """`attributes`: a dict, or a function returning one, called at most once and only
        if a plugin reads an attribute."""
        if attributes is None:
            attributes = {}
        elif not isinstance(attributes, dict):
            attributes = _Once(attributes)
        # One filter state per stream, as Envoy's: what one plugin sets with
        # proxy_set_property the others read (Higress plugins pass `ai_log` along this way).
        self.filter_state: dict[bytes, bytes] = {}
        self.filters = filters = [_Filter(slot, attributes, self.filter_state)
                                  for slot in slots]
        self._last = len(filters) - 1
        self.buffer_limit = buffer_limit
        self.state = _OPEN
        self.details = ""
        self.on_wakeup: Callable[[ChainStream], None] | None = None
        self._actions: list[ChainAction] = []
        self._response_started = False
        self._driving = False  # inside a call this stream made: wake-ups are picked up there
        self._replied: set[int] = set()  # filters whose local reply was acted on
        self._deny: _Filter | None = None  # the first stand-in that refuses the stream
        # A plugin released data or replied on its own (on_release): take_actions looks at
        # every filter only then (`_pump`); data a callback releases is propagated at once.
        self._dirty = False
        # Queued since the last take_actions: headers without end_of_stream (`_unframed`),
        # then the end of their body (`_reframe_due`): only then can `_reframe` change them.
        self._unframed = False
        self._reframe_due = False
        for f in filters:
            if f.context is not None:
                f.context.on_release = self._released
            elif self._deny is None and f.mode in ("deny", "fail"):
                self._deny = f

    # -- events in ---------------------------------------------------------------------------
    def request_headers(self, headers: object, end_of_stream: bool = False, *,
                        normalized: bool = False) -> None:
        """`normalized=True`: `headers` is already a list of lower-case (bytes, bytes)."""
        if self._deny is not None:
            self._refuse(self._deny)
            return
        pairs = headers if normalized else normalize_headers(headers)
        if self.state is _OPEN and self.filters:  # (`_feed_request(0, ...)` inlined)
            self._run(0, Released("request", "headers", pairs,  # type: ignore[arg-type]
                                  end_of_stream))
            return
        self._feed_request(0, Released("request", "headers", pairs,  # type: ignore[arg-type]
                                       end_of_stream))

    def request_body(self, data: bytes, end_of_stream: bool = False) -> None:
        self._feed_request(0, Released("request", "body", bytes(data), end_of_stream))

    def request_trailers(self, trailers: object) -> None:
        self._feed_request(0, Released("request", "trailers", normalize_headers(trailers), True))

    def response_headers(self, headers: object, end_of_stream: bool = False, *,
                         normalized: bool = False) -> None:
        pairs = headers if normalized else normalize_headers(headers)
        self._feed_response(self._last, Released(
            "response", "headers", pairs, end_of_stream))  # type: ignore[arg-type]

    def response_body(self, data: bytes, end_of_stream: bool = False) -> None:
        self._feed_response(self._last, Released("response", "body", bytes(data), end_of_stream))

    def response_trailers(self, trailers: object) -> None:
        self._feed_response(self._last, Released(
            "response", "trailers", normalize_headers(trailers), True))

    def complete(self) -> None:
        """The stream is over: on_log, on_done, on_delete in every plugin that saw it."""
        for f in self.filters:
            if f.context is not None:
                try:
                    f.context.complete()
                except PluginTrap as trap:
                    f.slot.on_crash(str(trap))
                f.context.on_release = None
        # Nothing can wake a finished stream: dropping the callbacks breaks the reference
        # cycles (stream <-> contexts, stream <-> server), so refcounting frees the whole
        # stream here instead of the cyclic gc later (~3 us per request in gen-0 passes).
        self.on_wakeup = None
        if self.state == StreamState.OPEN:
            self.state = StreamState.DONE

    def upstream_reply(self, status: int, body: bytes, details: str) -> None:
        """A reply the proxy makes itself (504, 503...): every plugin's response path sees it,
        as Envoy's router replies pass all encoder filters."""
        self._reply(len(self.filters), status, body, details)

    # -- actions out -------------------------------------------------------------------------
    def take_actions(self) -> list[ChainAction]:
        if self._dirty:
            self._dirty = False
            self._pump()
        actions = self._actions
        if not actions:
            return []
        self._actions = []
        self._unframed = False
        if self._reframe_due:
            self._reframe_due = False
            return _reframe(actions)
        return actions

    def headers_suspect(self) -> bool:
        """A plugin of this stream changed a header map (or replied with a suspect field):
        the server validates the heads it serializes in full only then (a plugin may have
        written CR, LF, NUL or a bad name; nothing else can)."""
        for f in self.filters:  # noqa: SIM110 - (a loop: no generator frame, per request)
            if f.context is not None and f.context.state.headers_written:
                return True
        return False

    def request_headers_seen(self) -> Pairs | None:
        """The request headers as the last plugin that saw them left them (the access log's
        view of a request a plugin answered itself)."""
        for f in reversed(self.filters):
            if f.context is not None and f.context.state.request_headers.pairs is not None:
                return f.context.state.request_headers.pairs
        return None

    @property
    def paused(self) -> bool:
        return any(f.context is not None and (f.context.request_paused
                                              or f.context.response_paused)
                   for f in self.filters)

    # -- propagation -------------------------------------------------------------------------
    def _released(self, _ctx: HttpContext) -> None:
        """A plugin released data or replied (after a callback, or on its own)."""
        self._dirty = True
        if self.on_wakeup is not None and not self._driving:
            self.on_wakeup(self)

    def _pump(self) -> None:
        """Act on what plugins did asynchronously: data released by continue_stream, and
        local replies sent from call-out callbacks (an http_call or Redis response)."""
        for index, f in enumerate(self.filters):
            ctx = f.context
            if ctx is None:
                continue
            if ctx.state.local_response is not None and index not in self._replied:
                self._replied.add(index)
                if self.state == _OPEN:
                    self._local_reply(index, ctx)
                continue
            if ctx.outbox:
                self._propagate(index, ctx.take_released())

    def _propagate(self, index: int, released: list[Released]) -> None:
        """What filter `index` let through goes on: request data to the next filter (or
        upstream), response data to the previous one (or the client). `_feed_request` and
        `_feed_response` inlined: this runs once per filter per event."""
        last = self._last
        for item in released:
            if item.direction == "request":
                if self.state is not _OPEN:
                    continue
                if index >= last:
                    self._queue_forward(item)
                else:
                    self._run(index + 1, item)
            elif self.state is not _RESET:
                if index <= 0:
                    self._send(item)
                else:
                    self._run(index - 1, item)

    def _feed_request(self, index: int, item: Released) -> None:
        if self.state is not _OPEN:
            return
        if index >= len(self.filters):
            self._queue_forward(item)
            return
        self._run(index, item)

    def _feed_response(self, index: int, item: Released) -> None:
        if self.state is _RESET:
            return
        if index < 0:
            self._send(item)
            return
        self._run(index, item)

    def _run(self, index: int, item: Released) -> None:
        f = self.filters[index]
        ctx = f.context
        if ctx is None or f.mode == "allow":
            self._propagate(index, [item])
            return
        state = ctx.state
        before = state.local_response
        kind = item.kind
        slot = f.slot
        started = perf_counter()
        self._driving = True
        try:
            if kind == "headers":
                action = ctx.feed_headers(item.direction, item.payload,  # type: ignore[arg-type]
                                          item.end_of_stream)
            elif kind == "body":
                action = ctx.feed_body(item.direction, item.payload,  # type: ignore[arg-type]
                                       item.end_of_stream)
            else:
                action = ctx.feed_trailers(item.direction, item.payload)  # type: ignore[arg-type]
        except (PluginTrap, PluginFailed) as exc:
            self._crash(index, f, item, exc)
            return
        finally:
            self._driving = False
            slot.callbacks += 1
            slot.callback_seconds += perf_counter() - started
        if state.local_response is not None and before is None:
            self._replied.add(index)
            self._local_reply(index, ctx)
            return
        if state.closed:
            self._reset("wasm_close_stream")
            return
        if action == Action.PAUSE and kind == "body":
            self._check_buffer(index, item.direction, ctx)
        released = ctx.outbox
        if released:
            ctx.outbox = []
            self._propagate(index, released)

    def _check_buffer(self, index: int, direction: str, ctx: HttpContext) -> None:
        size = len(ctx.request_body_now if direction == "request" else ctx.response_body_now)
        if size <= self.buffer_limit:
            return
        if direction == "request":
            self._reply(index, 413, b"Payload Too Large", "request_payload_too_large")
        else:
            self._reply(index, 500, b"Internal Server Error", "response_payload_too_large")

    def _crash(self, index: int, f: _Filter, item: Released, exc: Exception) -> None:
        self._dirty = True  # look at every filter at the next take_actions, as always
        if isinstance(exc, PluginTrap):  # PluginFailed: a crash already counted (one VM, one)
            f.slot.on_crash(str(exc))
        if f.slot.fail_strategy == FailStrategy.FAIL_OPEN:
            f.mode = "allow"
            self._propagate(index, [item])
            return
        self._reply(index, 503, b"", "wasm_fail_stream")

    def _refuse(self, f: _Filter) -> None:
        if f.mode == "fail":
            self._reply(len(self.filters), 503, b"", "wasm_fail_stream", run_plugins=False)
        else:
            self._reply(len(self.filters), 403, b"RBAC: access denied",
                        "wasm_plugin_unavailable", run_plugins=False)

    def _local_reply(self, index: int, ctx: HttpContext) -> None:
        response = ctx.local_response
        assert response is not None
        headers = [(b":status", str(response.status).encode()), *response.headers]
        self._reply(index, response.status, response.body, response.details, headers=headers)

    def _reply(self, index: int, status: int, body: bytes, details: str, *,
               headers: Pairs | None = None, run_plugins: bool = True) -> None:
        if self._response_started:
            self._reset(details)
            return
        self.state = StreamState.LOCAL_REPLY
        self.details = details
        pairs = headers or [(b":status", str(status).encode())]
        if body and not any(k == b"content-type" for k, _ in pairs):
            pairs.append((b"content-type", b"text/plain"))
        pairs = [(k, v) for k, v in pairs if k != b"content-length"]
        pairs.append((b"content-length", str(len(body)).encode()))
        start = index - 1 if run_plugins else -1
        self._feed_response(start, Released("response", "headers", pairs, not body))
        if body:
            self._feed_response(start, Released("response", "body", body, True))

    def _reset(self, details: str) -> None:
        self.state = StreamState.RESET
        self.details = details
        self._actions.append(Reset(details))

    def _queue_forward(self, item: Released) -> None:
        if item.kind == "headers":
            if not item.end_of_stream:
                self._unframed = True
        elif item.end_of_stream and self._unframed and item.kind == "body":
            self._reframe_due = True
        self._actions.append(_forward(item))

    def _send(self, item: Released) -> None:
        if item.kind == "headers":
            self._response_started = True
            if not item.end_of_stream:
                self._unframed = True
            self._actions.append(SendHeaders(item.payload, item.end_of_stream,  # type: ignore
                                             self.details))
        elif item.kind == "body":
            if item.end_of_stream and self._unframed:
                self._reframe_due = True
            self._actions.append(SendBody(item.payload, item.end_of_stream))  # type: ignore
        else:
            self._actions.append(SendTrailers(item.payload))  # type: ignore[arg-type]

    def describe(self) -> str:
        return f"<ChainStream {self.state.value} filters={len(self.filters)}>"


class _Once:
    """A stream's attributes factory, shared by its plugins: built at most once."""

    __slots__ = ("_factory", "_value")

    def __init__(self, factory: Callable[[], dict[str, object]]) -> None:
        self._factory = factory
        self._value: dict[str, object] | None = None

    def __call__(self) -> dict[str, object]:
        if self._value is None:
            self._value = self._factory()
        return self._value


def _forward(item: Released) -> ChainAction:
    if item.kind == "headers":
        return ForwardHeaders(item.payload, item.end_of_stream)  # type: ignore[arg-type]
    if item.kind == "body":
        return ForwardBody(item.payload, item.end_of_stream)  # type: ignore[arg-type]
    return ForwardTrailers(item.payload)  # type: ignore[arg-type]


def _reframe(actions: list[ChainAction]) -> list[ChainAction]:
    """Headers followed, in the same batch, by the whole body get a true content-length.
    `actions` is the caller's own list (changed in place and returned)."""
    for action in actions:
        if type(action) in _HEADERS and not action.end_of_stream:  # type: ignore[union-attr]
            break
    else:
        return actions  # nothing to re-frame (the common case)
    out = actions
    for i, action in enumerate(out):
        if not isinstance(action, ForwardHeaders | SendHeaders) or action.end_of_stream:
            continue
        body_type = ForwardBody if isinstance(action, ForwardHeaders) else SendBody
        chunks, complete = [], False
        for later in out[i + 1:]:
            if isinstance(later, body_type):
                chunks.append(later.data)
                if later.end_of_stream:
                    complete = True
                    break
            elif not isinstance(later, ForwardTrailers | SendTrailers):
                break
        if not complete:
            continue
        length = str(sum(len(c) for c in chunks)).encode()
        headers = [(k, v) for k, v in action.headers
                   if k not in (b"content-length", b"transfer-encoding")]
        headers.append((b"content-length", length))
        if isinstance(action, ForwardHeaders):
            out[i] = ForwardHeaders(headers, action.end_of_stream)
        else:
            out[i] = SendHeaders(headers, action.end_of_stream, action.details)
    return out


_HEADERS = (ForwardHeaders, SendHeaders)
