"""Shared fixtures: tiny models on disk and real servers on free loopback ports."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, Phase, settings

from salience_client.pb import salience_pb2_grpc
from salience_server.config import EngineConfig, ModelConfig, ServerConfig
from salience_server.engine.kv_pool import CPU_DEFAULT_KV_BYTES
from salience_server.engine.loader import default_gguf_path
from tests.helpers import TEST_DEVICE
from tests.tiny_models import build_tiny_model

# Profiles of the model-based stress test (tests/integration/test_stress.py). CI runs
# "ci": a fixed seed, a few hundred steps. By hand, for thousands of steps:
#   .venv/bin/pytest tests/integration/test_stress.py -s --timeout=0 \
#       --hypothesis-profile=stress-long
# (add --hypothesis-seed=N to replay a run).
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
settings.register_profile(
    "ci",
    max_examples=10,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=_SLOW_OK,
)
settings.register_profile(
    "stress-long",
    max_examples=120,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=_SLOW_OK,
    # A failure is reported as found: shrinking replays steps on a live server, whose
    # timing (what a preemption or a cancel meets) no replay reproduces exactly.
    phases=[Phase.explicit, Phase.generate],
    database=None,
)
settings.load_profile(os.environ.get("SALIENCE_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


LONG_CONTEXT = 65536
"""The positions of ``long_context_llama_dir``."""


@pytest.fixture(scope="session")
def long_context_llama_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with ``LONG_CONTEXT`` positions (the same weights: its tokens up to
    512 are the tiny Llama's), for a call that must still run when the test acts on it
    (a signal, a kill, a deadline): 60,000 tokens take a minute or more, where the tiny
    Llama's 512 positions end any call in about half a second."""
    model_dir = shutil.copytree(tiny_llama_dir, tmp_path_factory.mktemp("long-context") / "llama")
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = LONG_CONTEXT
    (model_dir / "config.json").write_text(json.dumps(config))
    return Path(model_dir)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3", seed=1)


@dataclass
class RunningServer:
    """A SalienceServer on its own event loop thread, and a stub connected to it."""

    port: int
    stub: salience_pb2_grpc.SalienceStub
    channel: grpc.Channel
    server: Any
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def engine(self) -> Any:
        return self.server.engine

    def stop(self) -> None:
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


def start_server(
    model: str | None,
    readout_path: str | None = None,
    api_key: str | None = None,
    server_options: dict[str, Any] | None = None,
    replica_id: str = "",
    dtype: str = "float32",
    device: str = TEST_DEVICE,
    **engine_options: Any,
) -> RunningServer:
    """Starts a real gRPC server for ``model`` on port 0 in a background thread
    (``server_options``: more ServerConfig fields; ``device``: ``cpu`` for a test of the
    CPU's own paths)."""
    from salience_server.rpc.server import SalienceServer

    if device != "cpu":
        # The CPU's default budget: on a GPU the default is most of its free memory,
        # which servers of several test processes sharing one GPU would fight over.
        engine_options.setdefault("kv_cache_bytes", CPU_DEFAULT_KV_BYTES)
    config = ServerConfig(
        port=0,
        model=ModelConfig(model=model, dtype=dtype, device=device),
        engine=EngineConfig(**engine_options),
        readout_path=readout_path,
        api_key=api_key,
        **(server_options or {}),
        replica_id=replica_id,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def boot() -> Any:
        server = SalienceServer(config)
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(boot(), loop).result(timeout=300)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return RunningServer(
        server.port, salience_pb2_grpc.SalienceStub(channel), channel, server, loop, thread
    )


@pytest.fixture
def server_factory() -> Iterator[Any]:
    """Starts servers on demand; stops them and checks the block pool at the end."""
    servers: list[RunningServer] = []

    def make(model: Path | str | None, **engine_options: Any) -> RunningServer:
        server = start_server(str(model) if model is not None else None, **engine_options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        engine = server.engine
        deadline = time.monotonic() + 10
        while engine.scheduler.has_work() and time.monotonic() < deadline:
            time.sleep(0.01)  # a call the test left winds down at the engine's next step
        with engine._lock:
            tables = [s.block_table for s in engine.sessions.values()]
            engine.block_manager.check_invariants(tables)
        server.stop()


@pytest.fixture(scope="module")
def llama_server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    server = start_server(str(tiny_llama_dir), block_size=4, kv_cache_bytes=4 << 20)
    yield server
    server.stop()


def default_model_available() -> bool:
    try:
        default_gguf_path()
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(scope="session")
def default_server() -> Iterator[RunningServer]:
    server = start_server(None, kv_cache_bytes=256 << 20)
    yield server
    server.stop()
