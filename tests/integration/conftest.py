"""Fixtures of the shim tests: the shim in front of the tiny Llama server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.shim_support import RunningShim, start_shim


@pytest.fixture(scope="module")
def shim(llama_server: Any) -> Iterator[RunningShim]:
    running = start_shim(llama_server.target)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def default_shim(default_server: Any) -> Iterator[RunningShim]:
    """The shim in front of the default model's server (installed by the setup)."""
    running = start_shim(default_server.target)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def model(shim: RunningShim) -> str:
    return shim.client().models.list().data[0].id
