"""Plugin log lines carry Envoy's prefix: ` name root_id vm_id` in a stream context, without
the name in the root context (proxy-wasm-cpp-host makeLogPrefix; Envoy context.cc log)."""

from __future__ import annotations

import logging

import pytest

from wasmgate.runtime.host import Host
from wasmgate.runtime.module import PluginModule
from wasmgate.runtime.plugin import Plugin, PluginConfig

from ..conftest import CONFORMANCE


def test_stream_logs_name_the_plugin_and_root_logs_do_not(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    module = PluginModule(CONFORMANCE.read_bytes(), source=str(CONFORMANCE))
    config = PluginConfig(name="default.auth", root_id="r1",
                          configuration=b"request_headers log 2 s:in-stream\n"
                                        b"configure log 2 s:in-root")
    plugin = Plugin(module, config, Host())
    plugin.start()
    plugin.new_http_context().request_headers({"a": "1"}, end_of_stream=True)
    lines = [r.getMessage() for r in caplog.records if "wasm log" in r.getMessage()]
    assert "wasm log r1: in-root" in lines
    assert "wasm log default.auth r1: in-stream" in lines
    plugin.close()
