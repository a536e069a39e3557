"""The shim in front of a server whose queue is full, or nearly: 429 with Retry-After,
and a request whose choices fit the running places and the queue taken at once."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from salience_client.pb import salience_pb2 as pb
from tests.helpers import engine_held_in_a_step, open_session
from tests.shim_support import HELLO, start_shim


def test_a_full_queue_is_429_with_retry_after(server_factory: Any, tiny_llama_dir: Any) -> None:
    """One running place, no queue: a request while a call holds the place is 429 with
    Retry-After, and the busy call runs on. The engine is held inside the busy call's
    first step while the shim is asked (decoding to the context's end takes only half
    a second here: the busy call could end, freeing the place, before the shim asked)."""
    server = server_factory(tiny_llama_dir, max_running=1, max_queue=0)
    running = start_shim(server.target)
    busy = None
    try:
        with engine_held_in_a_step(server.engine) as in_step:
            busy = server.stub.Generate(
                pb.GenerateRequest(
                    session_id=open_session(server.stub),
                    append_tokens=[1],
                    max_tokens=10_000,
                    ignore_eos=True,
                )
            )
            assert in_step.wait(10), "the busy call never ran"  # it holds the one place
            with pytest.raises(openai.RateLimitError) as error:
                running.client().chat.completions.create(model=tiny_llama_dir.name, messages=HELLO)
        assert error.value.response.headers["retry-after"] == "1"
        assert error.value.body["type"] == "rate_limit_error"
        *_, last = busy  # it ran on, to the context's end
        assert last.done.finish_reason == pb.FINISH_REASON_CONTEXT
    finally:
        if busy is not None:
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
