"""One plugin's view of one HTTP stream, driven the way Envoy's Wasm filter drives it.

Callback order: on_context_create (lazily, at the first event) -> request headers -> body
chunks -> trailers -> response headers -> body -> trailers -> on_log -> on_done -> on_delete.
Return values are converted as proxy-wasm-cpp-host does (headers 1 -> StopAllIteration unless
the ABI is Higress 0_2_100 or `allow_on_headers_stop_iteration`; a local reply forces stop).
Body returned PAUSE is buffered: the next chunk is appended and the callback sees the
accumulated size. Headers held with StopAll* hold the body too, until `proxy_continue_stream`,
which is applied after the callback that asked for it returns, and then replays what was held.

What the plugin lets through (headers it continued, body it released, trailers) is appended
to `outbox` as `Released` items, in order; a filter chain drains it and feeds the next filter.
`on_release` is called when the plugin releases data outside a call driven by the caller (a
`proxy_continue_stream` from an http_call response, for example).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .abi import Action
from .contexts import BodySlot, HeaderSlot, HttpContextState, LocalResponse, Phase
from .serde import Pairs, normalize_headers

if TYPE_CHECKING:
    from .plugin import Plugin

_CONTINUE = Action.CONTINUE
_PAUSE = Action.PAUSE
_STOP_ALL = (Action.STOP_ALL_ITERATION_AND_BUFFER, Action.STOP_ALL_ITERATION_AND_WATERMARK)
_WATERMARK = Action.STOP_ALL_ITERATION_AND_WATERMARK
_ACTIONS = tuple(Action)

Attributes = dict[str, object] | Callable[[], dict[str, object]]
"""The stream's attributes, or a function building them when a plugin first reads one."""


@dataclass(slots=True)
class Released:
    """Data the plugin let through: kind is "headers", "body" or "trailers"."""

    direction: str
    kind: str
    payload: Pairs | bytes
    end_of_stream: bool


class _Direction:
    """Per-direction flow state (held by StopAll headers, buffering a paused body), with the
    direction's maps, callback names and phases looked up once."""

    __slots__ = ("blocked", "body", "body_phase", "buffering", "ended", "headers",
                 "headers_eos", "headers_phase", "headers_released", "held", "name",
                 "on_body", "on_headers", "on_trailers", "trailers", "trailers_phase")

    def __init__(self, name: str, headers: HeaderSlot, body: BodySlot,
                 trailers: HeaderSlot) -> None:
        self.name = name
        self.blocked = False
        self.buffering = False
        self.held: list[tuple[str, object, bool]] = []
        self.ended = False
        self.headers_released = False
        self.headers_eos = False
        self.headers, self.body, self.trailers = headers, body, trailers
        self.on_headers, self.on_body, self.on_trailers, self.headers_phase, \
            self.body_phase, self.trailers_phase = _NAMES[name]


_NAMES = {
    "request": ("proxy_on_request_headers", "proxy_on_request_body",
                "proxy_on_request_trailers", Phase.REQUEST_HEADERS, Phase.REQUEST_BODY,
                Phase.REQUEST_TRAILERS),
    "response": ("proxy_on_response_headers", "proxy_on_response_body",
                 "proxy_on_response_trailers", Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY,
                 Phase.RESPONSE_TRAILERS),
}


class HttpContext:
    """Feed stream events in, read the plugin's decisions and mutations out."""

    def __init__(self, plugin: Plugin, attributes: Attributes,
                 filter_state: dict[bytes, bytes] | None = None) -> None:
        self.plugin = plugin
        vm = plugin._vm()
        self.vm = vm
        self.id = context_id = vm.new_context_id()
        self.state = state = HttpContextState(context_id, plugin.root)
        # A dict is copied (the caller may reuse it); a factory runs at the first read.
        state.attributes = dict(attributes) if isinstance(attributes, dict) else attributes
        if filter_state is not None:  # shared with the stream's other plugins
            state.filter_state = filter_state
        vm.contexts[context_id] = state
        state.handle = self
        plugin.active_streams += 1
        self._created = False
        self._request = _Direction("request", state.request_headers, state.request_body,
                                   state.request_trailers)
        self._response = _Direction("response", state.response_headers, state.response_body,
                                    state.response_trailers)
        abi = plugin.module.abi
        self._abi_010 = abi == "0_1_0"
        # True StopIteration (Higress 0_2_100): headers held but the body still flows.
        self._stop_iteration = abi == "0_2_100" or plugin.config.allow_on_headers_stop_iteration
        self.on_continue: Callable[[str], None] | None = None
        self.on_release: Callable[[HttpContext], None] | None = None
        self.outbox: list[Released] = []
        self.completed = False

    # -- views -------------------------------------------------------------------------------
    @property
    def local_response(self) -> LocalResponse | None:
        return self.state.local_response

    @property
    def request_headers_now(self) -> Pairs:
        return list(self.state.request_headers.pairs or [])

    @property
    def response_headers_now(self) -> Pairs:
        return list(self.state.response_headers.pairs or [])

    @property
    def request_trailers_now(self) -> Pairs:
        return list(self.state.request_trailers.pairs or [])

    @property
    def response_trailers_now(self) -> Pairs:
        return list(self.state.response_trailers.pairs or [])

    @property
    def request_body_now(self) -> bytes:
        return bytes(self.state.request_body.data)

    @property
    def response_body_now(self) -> bytes:
        return bytes(self.state.response_body.data)

    @property
    def request_paused(self) -> bool:
        return self._request.blocked or self._request.buffering

    @property
    def response_paused(self) -> bool:
        return self._response.blocked or self._response.buffering

    # -- events ------------------------------------------------------------------------------
    def _ensure_created(self) -> None:
        if not self._created:
            self._created = True
            self.vm.call("proxy_on_context_create", self.id, self.plugin.root.id,
                         context_id=self.id)

    def _call(self, name: str, *args: int) -> int | None:
        return self.vm.call(name, *args, context_id=self.id)

    def request_headers(self, headers: object, end_of_stream: bool = False) -> Action:
        return self.feed_headers("request", normalize_headers(headers), end_of_stream)

    def response_headers(self, headers: object, end_of_stream: bool = False) -> Action:
        return self.feed_headers("response", normalize_headers(headers), end_of_stream)

    def request_body(self, data: bytes, end_of_stream: bool = False) -> Action:
        return self.feed_body("request", bytes(data), end_of_stream)

    def response_body(self, data: bytes, end_of_stream: bool = False) -> Action:
        return self.feed_body("response", bytes(data), end_of_stream)

    def request_trailers(self, trailers: object) -> Action:
        return self.feed_trailers("request", normalize_headers(trailers))

    def response_trailers(self, trailers: object) -> Action:
        return self.feed_trailers("response", normalize_headers(trailers))

    def _flow(self, direction: str) -> _Direction:
        return self._request if direction == "request" else self._response

    def feed_headers(self, direction: str, pairs: Pairs, eos: bool) -> Action:
        context_id = self.id
        if not self._created:
            self._created = True
            self.vm.call("proxy_on_context_create", context_id, self.plugin.root.id,
                         context_id=context_id)
        flow = self._request if direction == "request" else self._response
        headers = flow.headers
        headers.pairs = pairs
        headers.readable = headers.writable = True
        state = self.state
        state.phase = flow.headers_phase
        flow.ended = eos
        if self._abi_010:
            raw = self.vm.call(flow.on_headers, context_id, len(pairs), context_id=context_id)
        else:
            raw = self.vm.call(flow.on_headers, context_id, len(pairs), 1 if eos else 0,
                               context_id=context_id)
        flow.headers_eos = eos
        if raw or state.local_response is not None:
            action = self._convert_headers(raw)
        else:  # the common case: Continue
            action = _CONTINUE
        if action in _STOP_ALL or action == _PAUSE:
            flow.blocked = True
        else:
            headers.readable = headers.writable = False
            if not flow.headers_released and state.local_response is None:
                flow.headers_released = True
                self.outbox.append(Released(direction, "headers", headers.pairs or [], eos))
        return action

    def _release_headers(self, direction: str) -> None:
        flow = self._flow(direction)
        if not flow.headers_released and self.state.local_response is None:
            flow.headers_released = True
            self.outbox.append(Released(direction, "headers", flow.headers.pairs or [],
                                        flow.headers_eos))

    def _convert_headers(self, raw: int | None) -> Action:
        if self.state.local_response is not None:
            return _WATERMARK
        if not raw:
            return _CONTINUE
        value = raw & 0xFFFFFFFF
        if value == Action.PAUSE:
            return _PAUSE if self._stop_iteration else _WATERMARK
        if value == Action.CONTINUE_AND_END_STREAM:
            return _CONTINUE
        if value > 4:
            return _WATERMARK
        return _ACTIONS[value]

    def feed_body(self, direction: str, data: bytes, eos: bool) -> Action:
        if not self._created:
            self._ensure_created()
        flow = self._request if direction == "request" else self._response
        if flow.blocked and not (flow.buffering or (flow.headers.readable
                                                    and self._stop_iteration)):
            flow.held.append(("body", data, eos))
            return _PAUSE
        return self._deliver_body(direction, data, eos)

    def _deliver_body(self, direction: str, data: bytes, eos: bool) -> Action:
        flow = self._request if direction == "request" else self._response
        body = flow.body
        if flow.buffering:
            body.data += data
        else:
            body.data = bytearray(data)
        body.readable = True
        body.end_of_stream = eos
        flow.ended = eos
        state = self.state
        state.phase = flow.body_phase
        context_id = self.id
        raw = self.vm.call(flow.on_body, context_id, len(body.data), 1 if eos else 0,
                           context_id=context_id)
        if state.local_response is not None:
            return _PAUSE
        if not raw or not raw & 0xFFFFFFFF:
            flow.buffering = False
            if flow.blocked:  # headers were held (true StopIteration): body continues them
                flow.blocked = False
                flow.headers.readable = flow.headers.writable = False
            if not flow.headers_released:
                self._release_headers(direction)
            # The chunk leaves this filter: later callbacks no longer see it (Envoy clears it).
            body.readable = False
            self.outbox.append(Released(direction, "body", bytes(body.data), eos))
            return _CONTINUE
        flow.buffering = True
        return _PAUSE

    def _release_body(self, direction: str) -> None:
        """The chunk leaves this filter: later callbacks no longer see it (Envoy clears it)."""
        body = self._flow(direction).body
        body.readable = False
        if self.state.local_response is None:
            self.outbox.append(Released(direction, "body", bytes(body.data), body.end_of_stream))

    def feed_trailers(self, direction: str, pairs: Pairs) -> Action:
        if not self._created:
            self._ensure_created()
        flow = self._flow(direction)
        if flow.blocked and not flow.buffering:
            flow.held.append(("trailers", pairs, True))
            return _PAUSE
        trailers = flow.trailers
        trailers.open(pairs)
        self.state.phase = flow.trailers_phase
        raw = self._call(flow.on_trailers, self.id, len(pairs))
        if (raw or 0) == 0 and self.state.local_response is None:
            trailers.close()
            self._release_headers(direction)
            self.outbox.append(Released(direction, "trailers", pairs, True))
            return _CONTINUE
        flow.blocked = True
        return _PAUSE

    # -- plugin-initiated flow changes (applied after the VM call returns) -------------------
    def resume(self, direction: str) -> None:
        """`proxy_continue_stream`: release held headers and replay what was held."""
        flow = self._flow(direction)
        flow.blocked = False
        flow.headers.close()
        self._release_headers(direction)
        if flow.buffering:
            flow.buffering = False
            self._release_body(direction)
        held, flow.held = flow.held, []
        if self.on_continue is not None:
            self.on_continue(direction)
        for kind, payload, eos in held:
            if kind == "body":
                self._deliver_body(direction, payload, eos)  # type: ignore[arg-type]
            else:
                self.feed_trailers(direction, payload)  # type: ignore[arg-type]
        if self.on_release is not None and self.outbox:
            self.on_release(self)

    def notify_local_reply(self) -> None:
        """The plugin sent a local reply (applied after its callback returned)."""
        if self.on_release is not None:
            self.on_release(self)

    def take_released(self) -> list[Released]:
        """Drain what the plugin let through since the last call."""
        released, self.outbox = self.outbox, []
        return released

    # -- end of stream -----------------------------------------------------------------------
    def complete(self) -> None:
        """on_log, on_done, on_delete (Envoy's order at stream destruction). Idempotent."""
        if self.completed:
            return
        self.completed = True
        s = self.state
        for slot in (s.request_headers, s.response_headers, s.request_trailers,
                     s.response_trailers):
            slot.readable, slot.writable = slot.pairs is not None, False
        s.phase = Phase.LOG
        vm = self.vm
        context_id = self.id
        try:
            # nothing to call if the VM failed, or was replaced (a FAIL_RELOAD restart) since
            # this stream began: the fresh VM never saw this context
            if not self.plugin.failed and self.plugin.vm is vm:
                if not self._created:
                    self._ensure_created()
                vm.call("proxy_on_log", context_id, context_id=context_id)
                s.phase = Phase.DONE
                vm.call("proxy_on_done", context_id, context_id=context_id)
                vm.call("proxy_on_delete", context_id, context_id=context_id)
        finally:  # a trap propagates (the plugin is already marked failed)
            s.deleted = True
            s.handle = None  # no reference cycle left: the stream is freed at once, not by gc
            vm.contexts.pop(context_id, None)
            plugin = self.plugin
            plugin.active_streams -= 1
            if plugin.active_streams == 0 and plugin.on_idle is not None:
                plugin.on_idle(plugin)

    def __repr__(self) -> str:
        return f"<HttpContext {self.id} {self.state.phase.value}>"
