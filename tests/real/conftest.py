"""Real third-party plugins, downloaded at test time (never committed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ..e2e.conftest import start_gateway, upstream  # noqa: F401  (gateway fixtures)
from .test_ai_plugins import collector, model  # noqa: F401  (the OpenAI-compatible upstream)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/real/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.real)
