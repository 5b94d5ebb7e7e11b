"""The filter chain over real plugins: ordering, pauses, local replies, failure policies."""

from __future__ import annotations

from wasmgate.chain import (
    FailStrategy,
    FilterChain,
    ForwardBody,
    ForwardHeaders,
    PluginSlot,
    Reset,
    SendBody,
    SendHeaders,
    SlotStatus,
)
from wasmgate.runtime.errors import RuntimeFailure
from wasmgate.runtime.host import Host
from wasmgate.runtime.module import PluginModule
from wasmgate.runtime.plugin import Plugin, PluginConfig

from ...conftest import CONFORMANCE, EXAMPLE

REQUEST = [(b":method", b"POST"), (b":path", b"/x"), (b":authority", b"svc")]


class RecordingHost(Host):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[object] = []
        self.lines: list[str] = []

    def http_call(self, plugin: Plugin, request: object) -> None:
        self.calls.append((plugin, request))

    def log(self, plugin: Plugin, level: object, message: str) -> None:
        self.lines.append(f"{plugin.name}: {message}")


def conformance(name: str, steps: str, host: Host, **kw: object) -> PluginSlot:
    plugin = Plugin(PluginModule.load(CONFORMANCE),
                    PluginConfig(name=name, configuration=steps.encode()), host)
    plugin.start()
    return PluginSlot(name, plugin=plugin, **kw)  # type: ignore[arg-type]


def example(host: Host, greeting: str = "hi") -> PluginSlot:
    plugin = Plugin(PluginModule.load(EXAMPLE),
                    PluginConfig(name="example", root_id="example",
                                 configuration=greeting.encode()), host)
    plugin.start()
    return PluginSlot("example", plugin=plugin)


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((v for k, v in headers if k == name), None)


def test_request_passes_plugins_in_order_and_response_in_reverse() -> None:
    host = RecordingHost()
    first = conformance("a", "request_headers add_header_map_value 0 s:x-order s:a\n"
                        "response_headers add_header_map_value 2 s:x-order s:a\n", host)
    second = conformance("b", "request_headers add_header_map_value 0 s:x-order s:b\n"
                         "response_headers add_header_map_value 2 s:x-order s:b\n", host)
    stream = FilterChain([first, second]).stream()
    stream.request_headers(REQUEST, end_of_stream=True)
    [forward] = stream.take_actions()
    assert isinstance(forward, ForwardHeaders)
    assert [v for k, v in forward.headers if k == b"x-order"] == [b"a", b"b"]
    stream.response_headers([(b":status", b"200")], end_of_stream=True)
    [send] = stream.take_actions()
    assert isinstance(send, SendHeaders)
    assert [v for k, v in send.headers if k == b"x-order"] == [b"b", b"a"]
    stream.complete()


def test_local_reply_skips_later_plugins_and_upstream() -> None:
    host = RecordingHost()
    stats = conformance("stats", "response_headers add_header_map_value 2 s:x-seen s:1\n", host)
    guard = example(host)
    never = conformance("never", "request_headers log 2 s:never-called\n", host)
    stream = FilterChain([stats, guard, never]).stream()
    stream.request_headers([(b":path", b"/deny/me"), (b":method", b"GET")], True)
    actions = stream.take_actions()
    assert not any(isinstance(a, ForwardHeaders) for a in actions)
    send = next(a for a in actions if isinstance(a, SendHeaders))
    assert header(send.headers, b":status") == b"403"
    assert header(send.headers, b"x-seen") == b"1"  # earlier plugins see the reply
    assert send.details == "denied_by_wasm_plugin"
    body = next(a for a in actions if isinstance(a, SendBody))
    assert body.data == b"denied by wasm plugin\n"
    assert header(send.headers, b"content-length") == str(len(body.data)).encode()
    assert not any("never-called" in line for line in host.lines)


def test_pause_holds_only_its_stream_and_resumes_after_the_call() -> None:
    host = RecordingHost()
    steps = ("request_headers http_call s:auth m::path=/a&:method=GET&:authority=auth s: null 0\n"
             "request_headers return 1\n"
             "http_call_response set_effective_context 2\n"
             "http_call_response continue_stream 0\n")
    auth = conformance("auth", steps, host)
    chain = FilterChain([auth])
    woken = []
    stream = chain.stream()
    stream.on_wakeup = woken.append
    stream.request_headers(REQUEST, end_of_stream=False)
    stream.request_body(b"payload", end_of_stream=True)
    assert stream.take_actions() == []
    assert stream.paused
    other = chain.stream()  # another stream is not held
    [(plugin, call)] = host.calls
    plugin.deliver_http_call_response(call.token, [(b":status", b"200")], b"")
    assert woken == [stream]
    actions = stream.take_actions()
    assert isinstance(actions[0], ForwardHeaders)
    assert actions[1] == ForwardBody(b"payload", True)
    assert header(actions[0].headers, b"content-length") == b"7"  # re-framed
    del other


def test_fail_close_gives_503_and_fail_open_bypasses() -> None:
    host = RecordingHost()
    closing = conformance("closing", "request_headers trap\n", host)
    stream = FilterChain([closing]).stream()
    stream.request_headers(REQUEST, True)
    [send] = stream.take_actions()
    assert isinstance(send, SendHeaders)
    assert header(send.headers, b":status") == b"503"
    assert send.details == "wasm_fail_stream"
    assert closing.status == SlotStatus.FAILED
    again = FilterChain([closing]).stream()
    again.request_headers(REQUEST, True)
    assert header(again.take_actions()[0].headers, b":status") == b"503"

    opening = conformance("opening", "request_headers trap\n", host,
                          fail_strategy=FailStrategy.FAIL_OPEN)
    stream = FilterChain([opening]).stream()
    stream.request_headers(REQUEST, True)
    [forward] = stream.take_actions()
    assert isinstance(forward, ForwardHeaders)


def test_fail_reload_builds_a_fresh_vm_for_the_next_stream() -> None:
    host = RecordingHost()
    now = [100.0]
    plugin = Plugin(PluginModule.load(CONFORMANCE),
                    PluginConfig(name="r", configuration=b"request_headers trap\n"), host)
    plugin.start()
    slot = PluginSlot("r", FailStrategy.FAIL_RELOAD, plugin, clock=lambda: now[0])
    first = FilterChain([slot]).stream()
    first.request_headers(REQUEST, True)
    assert header(first.take_actions()[0].headers, b":status") == b"503"
    second = FilterChain([slot]).stream()  # reloaded at once after the first crash
    assert slot.reloads == 1
    second.request_headers(REQUEST, True)
    assert slot.crashes == 2


def test_unavailable_plugin_stands_in_deny_or_allow() -> None:
    deny = PluginSlot("pending", FailStrategy.FAIL_CLOSE)
    stream = FilterChain([deny]).stream()
    stream.request_headers(REQUEST, True)
    actions = stream.take_actions()
    assert header(actions[0].headers, b":status") == b"403"
    allow = PluginSlot("pending", FailStrategy.FAIL_OPEN)
    stream = FilterChain([allow]).stream()
    stream.request_headers(REQUEST, True)
    assert isinstance(stream.take_actions()[0], ForwardHeaders)


def test_buffer_limit_gives_413() -> None:
    host = RecordingHost()
    buffering = conformance("buf", "request_body return 1\n", host)
    stream = FilterChain([buffering], buffer_limit=10).stream()
    stream.request_headers(REQUEST, False)
    stream.request_body(b"123456", False)
    assert [a for a in stream.take_actions() if not isinstance(a, ForwardHeaders)] == []
    stream.request_body(b"7890123", False)
    actions = stream.take_actions()
    send = next(a for a in actions if isinstance(a, SendHeaders))
    assert header(send.headers, b":status") == b"413"
    assert send.details == "request_payload_too_large"


def test_close_stream_resets() -> None:
    host = RecordingHost()
    closer = conformance("closer", "request_headers close_stream 0\n", host)
    stream = FilterChain([closer]).stream()
    stream.request_headers(REQUEST, True)
    assert stream.take_actions() == [Reset("wasm_close_stream")]


def test_local_reply_from_a_call_out_callback_wakes_the_stream() -> None:
    host = RecordingHost()
    steps = ("request_headers http_call s:auth m::path=/a&:method=GET&:authority=auth s: null 0\n"
             "request_headers return 1\n"
             "http_call_response set_effective_context 2\n"
             "http_call_response send_local_response 429 s:limited s:slow%20down null -1\n")
    limiter = conformance("limiter", steps, host)
    stream = FilterChain([limiter]).stream()
    woken = []
    stream.on_wakeup = woken.append
    stream.request_headers(REQUEST, end_of_stream=True)
    assert stream.take_actions() == []
    [(plugin, call)] = host.calls
    plugin.deliver_http_call_response(call.token, [(b":status", b"200")], b"")
    assert woken == [stream]
    actions = stream.take_actions()
    send = next(a for a in actions if isinstance(a, SendHeaders))
    assert header(send.headers, b":status") == b"429"
    assert send.details == "limited"
    assert not any(isinstance(a, ForwardHeaders) for a in actions)


def test_a_crash_counts_once_and_an_old_stream_cannot_touch_the_fresh_vm() -> None:
    """The root context traps while streams are open: a stream that meets the failed VM fails
    per failStrategy without counting a second crash (which would back FAIL_RELOAD off), and a
    stream completing after the restart calls nothing in the fresh VM (nor fails it)."""
    host = RecordingHost()
    now = [100.0]
    steps = ("request_headers http_call s:auth m::path=/a&:method=GET&:authority=auth s: null 0\n"
             "http_call_response trap\n")
    plugin = Plugin(PluginModule.load(CONFORMANCE),
                    PluginConfig(name="r", configuration=steps.encode()), host)
    plugin.start()
    slot = PluginSlot("r", FailStrategy.FAIL_RELOAD, plugin, clock=lambda: now[0])
    chain = FilterChain([slot])
    streaming = chain.stream()  # headers passed, its body still to come
    streaming.request_headers(REQUEST, False)
    assert isinstance(streaming.take_actions()[0], ForwardHeaders)
    waiting = chain.stream()
    waiting.request_headers(REQUEST, False)
    waiting.take_actions()
    request = host.calls[0][1]
    try:
        plugin.deliver_http_call_response(request.token, [(b":status", b"200")], b"", [])
    except RuntimeFailure as exc:  # what the gateway's host does with a root-context trap
        slot.on_crash(str(exc))
    assert plugin.failed and slot.crashes == 1
    streaming.request_body(b"x", True)  # meets the failed VM: 503, not a second crash
    assert header(streaming.take_actions()[0].headers, b":status") == b"503"
    assert slot.crashes == 1
    streaming.complete()
    fresh = chain.stream()  # one crash: reloaded at once
    assert slot.reloads == 1 and not plugin.failed
    waiting.complete()  # its on_log/on_done/on_delete belonged to the old VM
    assert not plugin.failed and slot.crashes == 1
    fresh.request_headers(REQUEST, True)
    assert isinstance(fresh.take_actions()[0], ForwardHeaders)
    assert len(host.calls) == 3  # the fresh VM runs
    fresh.complete()


def test_plugins_of_one_stream_share_its_filter_state() -> None:
    """Envoy keeps one filter state per stream: what one plugin sets with proxy_set_property
    the others read (gpustack-rate-limit reads the `ai_log` ai-statistics wrote, in on_log).
    It belongs to the stream: another stream starts without it."""
    host = RecordingHost()
    writer = conformance("writer", "request_headers set_property s:ai_log s:tokens-7\n", host)
    reader = conformance("reader", "request_headers get_property s:ai_log\n"
                         "response_headers get_property s:ai_log\n"
                         "log get_property s:ai_log\n", host)

    def reads(chain: FilterChain) -> list[str]:
        host.lines.clear()
        stream = chain.stream()
        stream.request_headers(REQUEST, end_of_stream=True)
        stream.take_actions()
        stream.response_headers([(b":status", b"200")], end_of_stream=True)
        stream.take_actions()
        stream.complete()
        return [line.split(": conf ")[1] for line in host.lines
                if line.startswith("reader: conf ")]

    seen = [f"{cb} get_property status=0 out=tokens-7"
            for cb in ("request_headers", "response_headers", "log")]
    assert reads(FilterChain([writer, reader])) == seen
    assert reads(FilterChain([reader])) == [f"{cb} get_property status=1 out="
                                            for cb in ("request_headers", "response_headers",
                                                       "log")]
    assert reads(FilterChain([writer, reader])) == seen
    # the reader first: in every stream of one chain its request_headers comes before the
    # writer's, so a value left over from the previous stream would show there
    reader_first = FilterChain([reader, writer])
    for _ in range(2):
        assert reads(reader_first) == ["request_headers get_property status=1 out=",
                                       "response_headers get_property status=0 out=tokens-7",
                                       "log get_property status=0 out=tokens-7"]
