"""FAIL_RELOAD: a stream begun on a VM that crashed keeps its HttpContext on that VM. When
the next stream restarts the plugin on a fresh VM (the old one closed), the older stream's
callbacks still fail (503), as they do without the restart: a closed VM answers PluginFailed,
never Continue, so what the plugin would have refused never goes upstream unchecked."""

from __future__ import annotations

from wasmgate.chain import FailStrategy, FilterChain, ForwardBody, PluginSlot, SendHeaders
from wasmgate.runtime.host import Host
from wasmgate.runtime.module import PluginModule
from wasmgate.runtime.plugin import Plugin, PluginConfig

from ...conftest import CONFORMANCE

REQUEST = [(b":method", b"POST"), (b":path", b"/x"), (b":authority", b"svc")]
STEPS = ("request_body send_local_response 403 s:denied s:no m: -1\n"
         "request_trailers trap\n")


def run(restart_between: bool) -> list[object]:
    plugin = Plugin(PluginModule.load(CONFORMANCE),
                    PluginConfig(name="guard", configuration=STEPS.encode()), Host())
    plugin.start()
    slot = PluginSlot("guard", FailStrategy.FAIL_RELOAD, plugin)
    chain = FilterChain([slot])
    older = chain.stream()
    older.request_headers(REQUEST, end_of_stream=False)  # the plugin lets the headers go
    older.take_actions()
    crashing = chain.stream()
    crashing.request_headers(REQUEST, end_of_stream=False)
    crashing.request_trailers([(b"x", b"y")])  # trap: the VM fails
    crashing.take_actions()
    crashing.complete()
    assert plugin.failed
    if restart_between:
        chain.stream().complete()  # the next stream: FAIL_RELOAD restarts the plugin
        assert not plugin.failed
    older.request_body(b"payload", end_of_stream=True)
    actions = older.take_actions()
    older.complete()
    return actions


def test_without_restart_the_older_stream_is_refused() -> None:
    actions = run(restart_between=False)
    assert not any(isinstance(a, ForwardBody) for a in actions)
    assert any(isinstance(a, SendHeaders) and (b":status", b"503") in a.headers for a in actions)


def test_after_restart_the_older_stream_is_not_let_through_unchecked() -> None:
    actions = run(restart_between=True)
    assert not any(isinstance(a, ForwardBody) for a in actions), actions
