"""pytest plugin (registered through the `pytest11` entry point): the `wasm_emulator` fixture.

    def test_adds_header(wasm_emulator):
        emu = wasm_emulator("plugin.wasm", plugin_config=b'{"x": 1}')
        stream = emu.http_context()
        assert stream.request_headers({":path": "/"}) == Action.CONTINUE

Emulators made through the fixture are started and closed for you.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .emulator import Emulator


@pytest.fixture
def wasm_emulator() -> Iterator[Callable[..., Emulator]]:
    made: list[Emulator] = []

    def make(wasm: Any, *args: Any, start: bool = True, **kwargs: Any) -> Emulator:
        emulator = Emulator(wasm, *args, **kwargs)
        made.append(emulator)
        return emulator.start() if start else emulator

    yield make
    for emulator in made:
        emulator.close()
