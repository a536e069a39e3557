"""A Completions request's batch is bounded: its prompts times ``n`` at most
``MAX_BATCH_CHOICES``, refused at once beyond that (a 400 naming ``prompt``), before
any prompt is tokenized or any generation starts."""

from __future__ import annotations

import threading
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


def test_a_huge_body_does_not_stall_the_other_requests(shim: RunningShim, model: str) -> None:
    """A 12 MiB body of 6 million token ids, decoded and checked on the event loop
    (and refused as a list of strings one error an id), held every other request for
    seconds (a 64 MiB one for a minute, /health included). It is decoded off the loop
    now, and refused as the same prompt of a few ids too many."""
    body = b'{"model": "%s", "max_tokens": 1, "prompt": [%s]}' % (
        model.encode(),
        b",".join([b"5"] * 6_000_000),
    )
    answer: dict[str, httpx.Response] = {}

    def post() -> None:
        answer["big"] = httpx.post(
            f"{shim.base_url}/completions",
            content=body,
            headers={"content-type": "application/json"},
            timeout=120,
        )

    caller = threading.Thread(target=post)
    caller.start()
    slowest = 0.0
    while caller.is_alive():
        start = time.monotonic()
        assert httpx.get(f"{shim.base_url}/models", timeout=120).status_code == 200
        slowest = max(slowest, time.monotonic() - start)
    caller.join()
    small = httpx.post(
        f"{shim.base_url}/completions",
        json={"model": model, "max_tokens": 1, "prompt": [5] * 600},
        timeout=60,
    )
    assert answer["big"].status_code == small.status_code == 400
    assert error_body(answer["big"])["code"] == error_body(small)["code"]
    assert error_body(small)["code"] == "context_length_exceeded"
    print(f"slowest small request: {slowest:.2f} s")
    assert slowest < 3.0, f"a small request waited {slowest:.1f} s behind the big body"
