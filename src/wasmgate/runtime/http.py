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

_STOP_ALL = (Action.STOP_ALL_ITERATION_AND_BUFFER, Action.STOP_ALL_ITERATION_AND_WATERMARK)
_ACTIONS = tuple(Action)


@dataclass(frozen=True)
class Released:
    """Data the plugin let through: kind is "headers", "body" or "trailers"."""

    direction: str
    kind: str
    payload: Pairs | bytes
    end_of_stream: bool


class _Direction:
    """Per-direction flow state: held by StopAll headers, buffering a paused body."""

    def __init__(self) -> None:
        self.blocked = False
        self.buffering = False
        self.held: list[tuple[str, object, bool]] = []
        self.ended = False
        self.headers_released = False
        self.headers_eos = False


class HttpContext:
    """Feed stream events in, read the plugin's decisions and mutations out."""

    def __init__(self, plugin: Plugin, attributes: dict[str, object]) -> None:
        self.plugin = plugin
        vm = plugin._vm()
        self.vm = vm
        self.state = HttpContextState(vm.new_context_id(), plugin.root)
        self.state.attributes = dict(attributes)
        vm.contexts[self.state.id] = self.state
        self.state.handle = self
        self._created = False
        self._request = _Direction()
        self._response = _Direction()
        self.on_continue: Callable[[str], None] | None = None
        self.on_release: Callable[[HttpContext], None] | None = None
        self.outbox: list[Released] = []
        self.completed = False

    @property
    def id(self) -> int:
        return self.state.id

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
            self._call("proxy_on_context_create", self.id, self.plugin.root.id)

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

    def _slots(self, direction: str) -> tuple[_Direction, HeaderSlot, BodySlot, HeaderSlot]:
        s = self.state
        if direction == "request":
            return self._request, s.request_headers, s.request_body, s.request_trailers
        return self._response, s.response_headers, s.response_body, s.response_trailers

    def feed_headers(self, direction: str, pairs: Pairs, eos: bool) -> Action:
        self._ensure_created()
        flow, headers, _, _ = self._slots(direction)
        headers.open(pairs)
        self.state.phase = Phase.REQUEST_HEADERS if direction == "request" else (
            Phase.RESPONSE_HEADERS)
        flow.ended = eos
        args: tuple[int, ...] = (self.id, len(pairs))
        if self.plugin.module.abi != "0_1_0":
            args += (int(eos),)
        raw = self._call(f"proxy_on_{direction}_headers", *args)
        action = self._convert_headers(raw)
        flow.headers_eos = eos
        if action in _STOP_ALL or action == Action.PAUSE:
            flow.blocked = True
        else:
            headers.close()
            self._release_headers(direction)
        return action

    def _release_headers(self, direction: str) -> None:
        flow, headers, _, _ = self._slots(direction)
        if not flow.headers_released and self.state.local_response is None:
            flow.headers_released = True
            self.outbox.append(Released(direction, "headers", headers.pairs or [],
                                        flow.headers_eos))

    def _convert_headers(self, raw: int | None) -> Action:
        if self.state.local_response is not None:
            return Action.STOP_ALL_ITERATION_AND_WATERMARK
        value = (raw or 0) & 0xFFFFFFFF
        if value == Action.PAUSE:
            keep = (self.plugin.module.abi == "0_2_100"
                    or self.plugin.config.allow_on_headers_stop_iteration)
            return Action.PAUSE if keep else Action.STOP_ALL_ITERATION_AND_WATERMARK
        if value == Action.CONTINUE_AND_END_STREAM:
            return Action.CONTINUE
        if value > 4:
            return Action.STOP_ALL_ITERATION_AND_WATERMARK
        return _ACTIONS[value]

    def feed_body(self, direction: str, data: bytes, eos: bool) -> Action:
        self._ensure_created()
        flow, headers, _, _ = self._slots(direction)
        if flow.blocked and not (flow.buffering or (headers.readable and self._stop_iteration())):
            flow.held.append(("body", data, eos))
            return Action.PAUSE
        return self._deliver_body(direction, data, eos)

    def _stop_iteration(self) -> bool:
        """True StopIteration (Higress 0_2_100): headers held but body still flows."""
        return (self.plugin.module.abi == "0_2_100"
                or self.plugin.config.allow_on_headers_stop_iteration)

    def _deliver_body(self, direction: str, data: bytes, eos: bool) -> Action:
        flow, headers, body, _ = self._slots(direction)
        if not flow.buffering:
            body.data = bytearray()
        body.data += data
        body.readable = True
        body.end_of_stream = eos
        flow.ended = eos
        self.state.phase = Phase.REQUEST_BODY if direction == "request" else Phase.RESPONSE_BODY
        raw = self._call(f"proxy_on_{direction}_body", self.id, len(body.data), int(eos))
        if self.state.local_response is not None:
            return Action.PAUSE
        value = (raw or 0) & 0xFFFFFFFF
        if value == 0:
            flow.buffering = False
            if flow.blocked:  # headers were held (true StopIteration): body continues them
                flow.blocked = False
                headers.close()
            self._release_headers(direction)
            self._release_body(direction)
            return Action.CONTINUE
        flow.buffering = True
        return Action.PAUSE

    def _release_body(self, direction: str) -> None:
        """The chunk leaves this filter: later callbacks no longer see it (Envoy clears it)."""
        _, _, body, _ = self._slots(direction)
        body.readable = False
        if self.state.local_response is None:
            self.outbox.append(Released(direction, "body", bytes(body.data), body.end_of_stream))

    def feed_trailers(self, direction: str, pairs: Pairs) -> Action:
        self._ensure_created()
        flow, _, _, trailers = self._slots(direction)
        if flow.blocked and not flow.buffering:
            flow.held.append(("trailers", pairs, True))
            return Action.PAUSE
        trailers.open(pairs)
        self.state.phase = (Phase.REQUEST_TRAILERS if direction == "request"
                            else Phase.RESPONSE_TRAILERS)
        raw = self._call(f"proxy_on_{direction}_trailers", self.id, len(pairs))
        if (raw or 0) == 0 and self.state.local_response is None:
            trailers.close()
            self._release_headers(direction)
            self.outbox.append(Released(direction, "trailers", pairs, True))
            return Action.CONTINUE
        flow.blocked = True
        return Action.PAUSE

    # -- plugin-initiated flow changes (applied after the VM call returns) -------------------
    def resume(self, direction: str) -> None:
        """`proxy_continue_stream`: release held headers and replay what was held."""
        flow, headers, _, _ = self._slots(direction)
        flow.blocked = False
        headers.close()
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
        try:
            if not self.plugin.failed:
                self._ensure_created()
                self._call("proxy_on_log", self.id)
                s.phase = Phase.DONE
                self._call("proxy_on_done", self.id)
                self._call("proxy_on_delete", self.id)
        finally:  # a trap propagates (the plugin is already marked failed)
            s.deleted = True
            self.vm.contexts.pop(self.id, None)

    def __repr__(self) -> str:
        return f"<HttpContext {self.id} {self.state.phase.value}>"
