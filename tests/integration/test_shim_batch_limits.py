"""A Completions request's batch is bounded: its prompts times ``n`` at most
``MAX_BATCH_CHOICES``, refused at once beyond that (a 400 naming ``prompt``), before
any prompt is tokenized or any generation starts."""

from __future__ import annotations

import time

import httpx
import pytest

from salience_server.http.schemas import MAX_BATCH_CHOICES
from tests.shim_support import RunningShim, error_body


@pytest.mark.parametrize(
    ("prompt", "n"),
    [
        (["a"] * (MAX_BATCH_CHOICES + 1), 1),
        ([[1]] * (MAX_BATCH_CHOICES // 64 + 1), 64),
    ],
    ids=["many-prompts", "prompts-times-n"],
)
def test_a_batch_past_the_limit_is_refused_at_once(
    shim: RunningShim, model: str, prompt: list, n: int
) -> None:
    start = time.monotonic()
    response = httpx.post(
        f"{shim.base_url}/completions",
        json={"model": model, "prompt": prompt, "n": n, "max_tokens": 1},
        timeout=120,
    )
    assert response.status_code == 400, response.text[:300]
    error = error_body(response)
    assert error["param"] == "prompt" and f"at most {MAX_BATCH_CHOICES}" in error["message"]
    assert time.monotonic() - start < 5
    assert shim.backend.pool.num_leased == 0


def test_a_batch_within_the_limit_is_answered(shim: RunningShim, model: str) -> None:
    response = httpx.post(
        f"{shim.base_url}/completions",
        json={"model": model, "prompt": [[1], [2, 3]], "n": 2, "max_tokens": 1},
        timeout=60,
    )
    assert response.status_code == 200, response.text[:300]
    assert [c["index"] for c in response.json()["choices"]] == [0, 1, 2, 3]
