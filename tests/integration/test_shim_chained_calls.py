"""A Responses chain past a forced function call: the chained request's prompt is the
conversation as the chat template writes it, the same as sent whole, on the tiny Llama
with more positions (the shim's description of the tools alone takes over 512)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import start_server
from tests.shim_support import RunningShim, start_shim

DECIDE = {
    "type": "function",
    "name": "decide",
    "parameters": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def long_shim(long_context_llama_dir: Path) -> Iterator[RunningShim]:
    server = start_server(str(long_context_llama_dir), block_size=4, kv_cache_bytes=4 << 20)
    running = start_shim(server.target)
    yield running
    running.stop()
    server.stop()


@pytest.mark.parametrize("tool_choice", [{"type": "function", "name": "decide"}, "required"])
def test_a_chain_past_a_forced_call_reads_the_call_as_the_template_writes_it(
    long_shim: RunningShim, tool_choice: Any
) -> None:
    """The session of a forced call holds the call's opening, which the shim wrote, and
    the arguments, where the grammar ends: not the closing ``}`` and ``</tool_call>``.
    A chained request continued that session as it was, so the model read a call cut
    short (14 tokens fewer than the conversation sent whole)."""
    client = long_shim.client()
    model = client.models.list().data[0].id
    options: dict[str, Any] = dict(model=model, tools=[DECIDE], temperature=0)
    first = client.responses.create(
        input="Decide.", tool_choice=tool_choice, max_output_tokens=200, **options
    )
    assert first.status == "completed"
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and all(call.status == "completed" for call in calls)
    results = [
        {"type": "function_call_output", "call_id": call.call_id, "output": "done"}
        for call in calls
    ]
    chained = client.responses.create(
        input=results, previous_response_id=first.id, max_output_tokens=2, **options
    )
    items = [
        {"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments}
        for c in calls
    ]
    whole = client.responses.create(
        input=[{"role": "user", "content": "Decide."}, *items, *results],
        max_output_tokens=2,
        **options,
    )
    assert chained.usage.input_tokens == whole.usage.input_tokens
    assert chained.output_text == whole.output_text
    # The first response's session was still lent for the prefix the two share.
    assert chained.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
