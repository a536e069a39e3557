"""The shim in front of a server whose queue is full, or nearly: 429 with Retry-After,
and a request whose choices fit the running places and the queue taken at once."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from salience_client.pb import salience_pb2 as pb
from tests.helpers import open_session
from tests.shim_support import HELLO, start_shim


def test_a_full_queue_is_429_with_retry_after(server_factory: Any, tiny_llama_dir: Any) -> None:
    server = server_factory(tiny_llama_dir, max_running=1, max_queue=0)
    running = start_shim(server.target)
    # Decoding to the context's end (hundreds of steps) holds the one place: none may wait.
    busy = server.stub.Generate(
        pb.GenerateRequest(
            session_id=open_session(server.stub),
            append_tokens=[1],
            max_tokens=10_000,
            ignore_eos=True,
        )
    )
    next(busy)
    try:
        with pytest.raises(openai.RateLimitError) as error:
            running.client().chat.completions.create(model=tiny_llama_dir.name, messages=HELLO)
        assert error.value.response.headers["retry-after"] == "1"
        assert error.value.body["type"] == "rate_limit_error"
        *_, last = busy  # it ran on, to the context's end
        assert last.done.finish_reason == pb.FINISH_REASON_CONTEXT
    finally:
        busy.cancel()
        running.stop()


def test_n_choices_that_fit_the_running_places_and_queue_are_taken(
    server_factory: Any, tiny_llama_dir: Any
) -> None:
    """An idle server takes a request's n = max_running + max_queue choices at once (its
    forks, waiting for the next step, counted as queued: 429 every time)."""
    server = server_factory(tiny_llama_dir, max_running=2, max_queue=1)
    running = start_shim(server.target)
    try:
        reply = running.client().completions.create(
            model=tiny_llama_dir.name, prompt="Once upon", n=3, max_tokens=2
        )
        assert sorted(choice.index for choice in reply.choices) == [0, 1, 2]
    finally:
        running.stop()
