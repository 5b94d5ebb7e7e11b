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
from ..runtime.http import HttpContext, Released
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

    def __init__(self, slot: PluginSlot, attributes: dict[str, object]) -> None:
        self.slot = slot
        self.mode = slot.stand_in()  # None = run the plugin
        self.context: HttpContext | None = None
        if self.mode is None:
            assert slot.plugin is not None
            self.context = slot.plugin.new_http_context(attributes)
            slot.streams += 1


class ChainStream:
    def __init__(self, slots: list[PluginSlot], attributes: dict[str, object] | None = None,
                 *, buffer_limit: int = DEFAULT_BUFFER_LIMIT) -> None:
        self.filters = [_Filter(slot, attributes or {}) for slot in slots]
        self.buffer_limit = buffer_limit
        self.state = StreamState.OPEN
        self.details = ""
        self.on_wakeup: Callable[[ChainStream], None] | None = None
        self._actions: list[ChainAction] = []
        self._response_started = False
        self._driving = False  # inside a call this stream made: wake-ups are picked up there
        self._replied: set[int] = set()  # filters whose local reply was acted on
        for index, f in enumerate(self.filters):
            if f.context is not None:
                f.context.on_release = lambda _ctx, i=index: self._wakeup(i)

    # -- events in ---------------------------------------------------------------------------
    def request_headers(self, headers: object, end_of_stream: bool = False, *,
                        normalized: bool = False) -> None:
        """`normalized=True`: `headers` is already a list of lower-case (bytes, bytes)."""
        deny = next((f for f in self.filters if f.mode in ("deny", "fail")), None)
        if deny is not None:
            self._deny(deny)
            return
        pairs = headers if normalized else normalize_headers(headers)
        self._feed_request(0, Released("request", "headers", pairs,  # type: ignore[arg-type]
                                       end_of_stream))

    def request_body(self, data: bytes, end_of_stream: bool = False) -> None:
        self._feed_request(0, Released("request", "body", bytes(data), end_of_stream))

    def request_trailers(self, trailers: object) -> None:
        self._feed_request(0, Released("request", "trailers", normalize_headers(trailers), True))

    def response_headers(self, headers: object, end_of_stream: bool = False, *,
                         normalized: bool = False) -> None:
        pairs = headers if normalized else normalize_headers(headers)
        self._feed_response(len(self.filters) - 1, Released(
            "response", "headers", pairs, end_of_stream))  # type: ignore[arg-type]

    def response_body(self, data: bytes, end_of_stream: bool = False) -> None:
        self._feed_response(len(self.filters) - 1,
                            Released("response", "body", bytes(data), end_of_stream))

    def response_trailers(self, trailers: object) -> None:
        self._feed_response(len(self.filters) - 1, Released(
            "response", "trailers", normalize_headers(trailers), True))

    def complete(self) -> None:
        """The stream is over: on_log, on_done, on_delete in every plugin that saw it."""
        for f in self.filters:
            if f.context is not None:
                try:
                    f.context.complete()
                except PluginTrap as trap:
                    f.slot.on_crash(str(trap))
        if self.state == StreamState.OPEN:
            self.state = StreamState.DONE

    def upstream_reply(self, status: int, body: bytes, details: str) -> None:
        """A reply the proxy makes itself (504, 503...): every plugin's response path sees it,
        as Envoy's router replies pass all encoder filters."""
        self._reply(len(self.filters), status, body, details)

    # -- actions out -------------------------------------------------------------------------
    def take_actions(self) -> list[ChainAction]:
        self._pump()
        actions, self._actions = self._actions, []
        return _reframe(actions)

    @property
    def paused(self) -> bool:
        return any(f.context is not None and (f.context.request_paused
                                              or f.context.response_paused)
                   for f in self.filters)

    # -- propagation -------------------------------------------------------------------------
    def _wakeup(self, index: int) -> None:
        if self.on_wakeup is not None and not self._driving:
            self.on_wakeup(self)

    def _pump(self) -> None:
        """Act on what plugins did asynchronously: data released by continue_stream, and
        local replies sent from call-out callbacks (an http_call or Redis response)."""
        for index, f in enumerate(self.filters):
            ctx = f.context
            if ctx is None:
                continue
            if ctx.local_response is not None and index not in self._replied:
                self._replied.add(index)
                if self.state == StreamState.OPEN:
                    self._local_reply(index, ctx)
                continue
            if ctx.outbox:
                self._propagate(index, ctx.take_released())

    def _propagate(self, index: int, released: list[Released]) -> None:
        for item in released:
            if item.direction == "request":
                self._feed_request(index + 1, item)
            else:
                self._feed_response(index - 1, item)

    def _feed_request(self, index: int, item: Released) -> None:
        if self.state != StreamState.OPEN:
            return
        if index >= len(self.filters):
            self._actions.append(_forward(item))
            return
        self._run(index, item)

    def _feed_response(self, index: int, item: Released) -> None:
        if self.state == StreamState.RESET:
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
        before = ctx.local_response
        started = perf_counter()
        self._driving = True
        try:
            action = _dispatch(ctx, item)
        except (PluginTrap, PluginFailed) as exc:
            self._crash(index, f, item, exc)
            return
        finally:
            self._driving = False
            f.slot.callbacks += 1
            f.slot.callback_seconds += perf_counter() - started
        if ctx.local_response is not None and before is None:
            self._replied.add(index)
            self._local_reply(index, ctx)
            return
        if ctx.state.closed:
            self._reset("wasm_close_stream")
            return
        if action == Action.PAUSE and item.kind == "body":
            self._check_buffer(index, item.direction, ctx)
        self._propagate(index, ctx.take_released())

    def _check_buffer(self, index: int, direction: str, ctx: HttpContext) -> None:
        size = len(ctx.request_body_now if direction == "request" else ctx.response_body_now)
        if size <= self.buffer_limit:
            return
        if direction == "request":
            self._reply(index, 413, b"Payload Too Large", "request_payload_too_large")
        else:
            self._reply(index, 500, b"Internal Server Error", "response_payload_too_large")

    def _crash(self, index: int, f: _Filter, item: Released, exc: Exception) -> None:
        f.slot.on_crash(str(exc))
        if f.slot.fail_strategy == FailStrategy.FAIL_OPEN:
            f.mode = "allow"
            self._propagate(index, [item])
            return
        self._reply(index, 503, b"", "wasm_fail_stream")

    def _deny(self, f: _Filter) -> None:
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

    def _send(self, item: Released) -> None:
        if item.kind == "headers":
            self._response_started = True
            self._actions.append(SendHeaders(item.payload, item.end_of_stream,  # type: ignore
                                             self.details))
        elif item.kind == "body":
            self._actions.append(SendBody(item.payload, item.end_of_stream))  # type: ignore
        else:
            self._actions.append(SendTrailers(item.payload))  # type: ignore[arg-type]

    def describe(self) -> str:
        return f"<ChainStream {self.state.value} filters={len(self.filters)}>"


def _dispatch(ctx: HttpContext, item: Released) -> Action:
    """Items inside the chain are normalized already: use the context's direct entry points."""
    if item.kind == "headers":
        return ctx.feed_headers(item.direction, item.payload,  # type: ignore[arg-type]
                                item.end_of_stream)
    if item.kind == "body":
        return ctx.feed_body(item.direction, item.payload, item.end_of_stream)  # type: ignore
    return ctx.feed_trailers(item.direction, item.payload)  # type: ignore[arg-type]


def _forward(item: Released) -> ChainAction:
    if item.kind == "headers":
        return ForwardHeaders(item.payload, item.end_of_stream)  # type: ignore[arg-type]
    if item.kind == "body":
        return ForwardBody(item.payload, item.end_of_stream)  # type: ignore[arg-type]
    return ForwardTrailers(item.payload)  # type: ignore[arg-type]


def _reframe(actions: list[ChainAction]) -> list[ChainAction]:
    """Headers followed, in the same batch, by the whole body get a true content-length."""
    out = list(actions)
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
