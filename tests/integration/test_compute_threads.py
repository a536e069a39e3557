"""Heavy torch work outside the engine thread runs on threads that end with it: an
OpenMP pool left on a living thread made every parallel region of the engine's steps
wait (``salience_server.rpc.compute_thread``)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import pytest

from salience_client.pb import salience_pb2 as pb
from salience_server.config import ModelConfig, ServerConfig
from salience_server.engine.engine import Engine
from salience_server.rpc import server as server_module
from salience_server.rpc.compute_thread import in_own_thread
from tests.conftest import start_server
from tests.helpers import open_session
from tests.tiny_models import build_tiny_vision_model


def test_in_own_thread_returns_after_its_thread_ended_and_raises_its_error() -> None:
    seen: list[threading.Thread] = []

    def work(value: int) -> int:
        seen.append(threading.current_thread())
        if value < 0:
            raise ValueError("negative")
        return value * 2

    async def main() -> None:
        assert await in_own_thread(work, 21) == 42
        assert not seen[-1].is_alive() and seen[-1] is not threading.current_thread()
        with pytest.raises(ValueError, match="negative"):
            await in_own_thread(work, -1)
        assert seen[0] is not seen[1]  # a new thread each time

    asyncio.run(main())


def test_the_model_loads_and_images_encode_on_threads_that_end(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: dict[str, list[threading.Thread]] = {"load": [], "encode": []}
    load_model, encode_image = server_module.load_model, Engine.encode_image

    def recording_load(*args: object) -> object:
        threads["load"].append(threading.current_thread())
        return load_model(*args)  # type: ignore[arg-type]

    def recording_encode(self: Engine, *args: object) -> object:
        threads["encode"].append(threading.current_thread())
        return encode_image(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(server_module, "load_model", recording_load)
    monkeypatch.setattr(Engine, "encode_image", recording_encode)
    model_dir = build_tiny_vision_model(tmp_path_factory.mktemp("vl"), "qwen2_vl")
    server = start_server(str(model_dir), block_size=4, kv_cache_bytes=4 << 20)
    try:
        from tests.vision_support import encode, make_image

        session_id = open_session(server.stub)
        server.stub.AppendImage(
            pb.AppendImageRequest(
                session_id=session_id, image=encode(make_image(1)), mime_type="image/png"
            )
        )
        for name in ("load", "encode"):
            (thread,) = threads[name]
            assert not thread.is_alive(), f"the {name} thread lives on"
            assert thread is not server.thread  # not the event loop's
    finally:
        server.stop()


def test_a_signal_during_a_long_load_stops_the_server_at_once(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the model loads (a first conversion can take minutes) ends
    ``serve`` without waiting for the load."""
    loading, release = threading.Event(), threading.Event()
    load_model = server_module.load_model
    loaders: list[threading.Thread] = []

    def slow_load(config: ModelConfig) -> object:
        loaders.append(threading.current_thread())
        loading.set()
        release.wait(60)
        return load_model(config)

    monkeypatch.setattr(server_module, "load_model", slow_load)

    def signal_once_loading() -> None:
        if loading.wait(60):
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_once_loading, daemon=True).start()
    config = ServerConfig(port=0, model=ModelConfig(model=str(tiny_llama_dir)))
    try:
        asyncio.run(asyncio.wait_for(server_module.serve(config), timeout=30))
        assert loading.is_set() and not release.is_set()  # the load never finished
    finally:
        release.set()
    (loader,) = loaders
    loader.join(60)  # it finishes the load on its own, and no one takes the result
    assert not loader.is_alive()
