"""Fixtures of the shim tests (the shim in front of the tiny Llama server) and of the
client and CLI tests (a server process on the tiny Llama, a client of it; a fake
replica)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from salience_client import SalienceClient
from tests.client_support import served_tiny_llama
from tests.fake_replica import RunningFake, start_fake
from tests.shim_support import RunningShim, Script, start_scripted, start_shim
from tests.tiny_models import build_tiny_vision_model, reference_vision_model


@pytest.fixture
def fake() -> Iterator[RunningFake]:
    """A fake replica (``tests/fake_replica.py``): sessions as token lists, scripted
    faults."""
    running = start_fake()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def shim(llama_server: Any) -> Iterator[RunningShim]:
    running = start_shim(llama_server.target)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[Script, RunningShim]]:
    """A shim in front of a scripted fake server, whose replies the test writes."""
    script = Script()
    server = start_scripted(script)
    running = start_shim(server.target)
    yield script, running
    running.stop()
    server.stop()


@pytest.fixture(scope="session")
def default_shim(default_server: Any) -> Iterator[RunningShim]:
    """The shim in front of the default model's server (installed by the setup)."""
    running = start_shim(default_server.target)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def model(shim: RunningShim) -> str:
    return shim.client().models.list().data[0].id


@pytest.fixture(scope="module")
def server_target(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a server process on the tiny Llama (one per test module)."""
    with served_tiny_llama(tiny_llama_dir, tmp_path_factory.mktemp("server")) as target:
        yield target


@pytest.fixture
def client(server_target: str) -> Iterator[SalienceClient]:
    with SalienceClient(server_target, timeout=30) as client:
        yield client


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def vision(request: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server on a tiny Qwen2-VL (and Qwen2.5-VL), with its model directory and the
    transformers reference model."""
    from tests.conftest import start_server  # the root conftest, loaded first

    model_dir = build_tiny_vision_model(tmp_path_factory.mktemp(request.param), request.param)
    server = start_server(str(model_dir), block_size=4, kv_cache_bytes=4 << 20)
    server.extra.update(model_dir=model_dir, reference=reference_vision_model(model_dir))
    yield server
    server.stop()
