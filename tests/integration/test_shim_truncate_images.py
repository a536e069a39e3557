"""``truncate_prompt_tokens`` on a chat holding an image the shim has not seen before
counts the image at its true length (tiny Qwen2-VL): the same request keeps the same
tokens, or is refused the same way, whether it is the first to carry the image or not.
Before, an unseen image counted as one token: the first request kept more than asked,
or cut into the image where a repeat was refused."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from salience_client.pb import salience_pb2 as pb
from tests.conftest import RunningServer, start_server
from tests.shim_support import RunningShim, error_body, start_shim
from tests.tiny_models import build_tiny_vision_model
from tests.vision_support import encode, make_image


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    model_dir = build_tiny_vision_model(tmp_path_factory.mktemp("truncate-vl"), "qwen2_vl")
    server = start_server(str(model_dir), block_size=4, kv_cache_bytes=1 << 20)
    yield server
    server.stop()


@pytest.fixture
def fresh_shim(vision_server: RunningServer) -> Iterator[RunningShim]:
    """A shim that knows no image's length yet."""
    running = start_shim(vision_server.target)
    yield running
    running.stop()


def _messages(seed: int) -> list[dict[str, Any]]:
    url = "data:image/png;base64," + base64.b64encode(encode(make_image(seed))).decode()
    parts = [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "x"}]}]


def _image_run(server: RunningServer, shim: RunningShim, seed: int) -> tuple[int, int, int]:
    """(prompt length, first pad index, pads) of the chat's prompt, from /tokenize on
    another shim (so that ``shim`` learns nothing from it)."""
    other = start_shim(server.target)
    try:
        root = other.base_url.removesuffix("/v1")
        ids = httpx.post(f"{root}/tokenize", json={"messages": _messages(seed)}).json()["tokens"]
    finally:
        other.stop()
    pad = server.stub.GetModelInfo(pb.GetModelInfoRequest()).image_pad_token_id
    first = ids.index(pad)
    return len(ids), first, ids.count(pad)


def _chat(shim: RunningShim, seed: int, keep: int) -> httpx.Response:
    model = shim.client().models.list().data[0].id
    body = {"model": model, "messages": _messages(seed), "max_tokens": 1}
    body["truncate_prompt_tokens"] = keep
    return httpx.post(f"{shim.base_url}/chat/completions", json=body, timeout=60)


def test_a_cut_inside_an_unseen_image_is_refused_the_first_time(
    vision_server: RunningServer, fresh_shim: RunningShim
) -> None:
    length, first_pad, pads = _image_run(vision_server, fresh_shim, seed=21)
    assert pads > 1
    keep = length - (first_pad + 1)  # the cut falls after the image's first pad
    for _ in range(2):  # the first request, then its repeat
        response = _chat(fresh_shim, 21, keep)
        assert response.status_code == 400, response.text[:300]
        assert "cut an image in two" in error_body(response)["message"]


def test_the_first_request_keeps_as_many_tokens_as_asked(
    vision_server: RunningServer, fresh_shim: RunningShim
) -> None:
    length, first_pad, _ = _image_run(vision_server, fresh_shim, seed=22)
    keep = length - first_pad + 1  # the whole image, and the token before it
    counts = []
    for _ in range(2):
        response = _chat(fresh_shim, 22, keep)
        assert response.status_code == 200, response.text[:300]
        counts.append(response.json()["usage"]["prompt_tokens"])
    assert counts == [keep, keep]
