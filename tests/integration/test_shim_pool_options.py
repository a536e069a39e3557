"""The less-travelled request options through a pool that reuses sessions equal the same
requests with no reuse: each request follows others sharing its prefix (the pool
continues, rewinds or forks a session, or scores from kept scores), and is sent again
to a shim whose pool is emptied first (``Reference``). Chat: continuing the final
message, no generation prompt, ``echo``, a prompt cut to its last tokens, prompt
logprobs, ``logit_bias``, ``min_tokens``, stop strings kept in the text, seeded n > 1;
Completions: token-id and text prompts over one context, scored with ``echo``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.test_shim_pool_oracle import (
    Exchange,
    Reference,
    cached_tokens,
    differences,
    shaped,
    token_counts,
)
from tests.shim_support import RunningShim, start_shim

SYSTEM = {"role": "system", "content": "You answer briefly, about the sea and its tides. " * 2}
ASKED = [SYSTEM, {"role": "user", "content": "tell me of tides"}]
TEXT = "one fish, two fish, red fish, blue fish"


@pytest.fixture(scope="module")
def shims(llama_server: Any) -> Iterator[tuple[RunningShim, Reference]]:
    shim = start_shim(llama_server.target, max_pooled_sessions=4)
    reference = Reference(
        start_shim(llama_server.target, max_pooled_sessions=1), llama_server.target
    )
    yield shim, reference
    shim.stop()
    reference.shim.stop()


def _check(shims: tuple[RunningShim, Reference], path: str, body: dict[str, Any]) -> Any:
    """``body`` sent through the pool, checked against the reference; the reply."""
    shim, reference = shims
    with httpx.Client(timeout=60) as http:
        response = http.post(shim.base_url + path, json=body)
        reply = shaped(path, response.status_code, response.json())
        status, want = reference.answer(http, Exchange(path, body, response.status_code, reply))
    where = f"{path} {json.dumps(body)[:200]}"
    assert response.status_code == 200, (where, response.json())
    assert (response.status_code, token_counts(reply)) == (status, token_counts(want)), where
    assert not differences(reply, want), (where, differences(reply, want)[:3])
    if path == "/chat/completions":  # the last prompt token is always fed (for its logits)
        assert cached_tokens(reply) < reply["usage"]["prompt_tokens"], where
    return response.json()


def test_chat_options_after_requests_sharing_their_prefix(
    shims: tuple[RunningShim, Reference], model: str
) -> None:
    base = {"model": model, "temperature": 0, "max_tokens": 6}
    reply = _check(shims, "/chat/completions", {**base, "messages": ASKED})
    content = reply["choices"][0]["message"]["content"]
    opened = [*ASKED, {"role": "assistant", "content": content[:3]}]
    seeded = {"temperature": 1.0, "seed": 5}
    bodies: list[dict[str, Any]] = [
        {"messages": opened, "continue_final_message": True, "logprobs": True, "top_logprobs": 2},
        {"messages": opened, "continue_final_message": True, "echo": True, "n": 2, **seeded},
        {"messages": ASKED, "add_generation_prompt": False},
        {"messages": ASKED, "truncate_prompt_tokens": 40, "logprobs": True},
        {"messages": ASKED, "prompt_logprobs": 2},
        {"messages": opened, "continue_final_message": True, "prompt_logprobs": 1, "n": 2},
        {"messages": ASKED, "logit_bias": {"70": 100}, "min_tokens": 6},
        {"messages": ASKED, "stop": ["e", "a"], "include_stop_str_in_output": True},
        {"messages": ASKED, "n": 3, "min_tokens": 3, **seeded},
        {"messages": ASKED, "n": 3, "stop": ["e"], "include_stop_str_in_output": True, **seeded},
    ]
    for body in bodies:
        reply = _check(shims, "/chat/completions", {**base, **body})
        said = reply["choices"][0]["message"]["content"]
        # The next turn: the reply (a continued message whole) and a new user message.
        continues = body.pop("continue_final_message", False)
        history = body.pop("messages")
        if continues:
            said = said if body.get("echo") else history[-1]["content"] + said
            history = history[:-1]
        follow_up = [*history, {"role": "assistant", "content": said}, ASKED[-1]]
        _check(shims, "/chat/completions", {**base, **body, "messages": follow_up})


def test_token_id_and_text_prompts_share_one_pool(
    shims: tuple[RunningShim, Reference], model: str
) -> None:
    base = {"model": model, "temperature": 0, "max_tokens": 4, "echo": True, "logprobs": 1}
    reply = _check(shims, "/completions", {**base, "prompt": TEXT, "return_token_ids": True})
    ids = reply["choices"][0]["prompt_token_ids"] + reply["choices"][0]["token_ids"]
    for prompt, extra in [
        (ids, {"max_tokens": 0}),
        (ids + [65], {"logit_bias": {"70": 50}, "return_token_ids": True}),
        (TEXT + " green fish", {"logprobs": 2}),
        ([ids[:20], ids[:25]], {"n": 2, "temperature": 1.0, "seed": 3}),
        (ids[:20], {"truncate_prompt_tokens": 12}),
        (TEXT, {"stop": ["fish"], "include_stop_str_in_output": True, "max_tokens": 12}),
    ]:
        _check(shims, "/completions", {**base, "prompt": prompt, **extra})
