"""A session at its context limit (SPEC 2.1, 2.5): appends one past it are refused and
change nothing, a decode that would cross it stops there with ``context``, and a full
session still scores, forks, rewinds and decodes again. Oracle: one transformers
forward pass over the same tokens."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from salience_client.pb import salience_pb2 as pb
from tests.helpers import (
    U32_MAX,
    error_reason,
    generate,
    open_session,
    random_tokens,
    reference_logprobs,
    session_info,
)
from tests.tiny_models import reference_model

LIMIT = 20
TOKENS = random_tokens(LIMIT + 1, seed=1)


def _check(events: list[pb.Token], token_ids: list[int], oracle) -> None:
    """Each event's token and logprob equal the forward pass over ``token_ids``."""
    want = reference_logprobs(oracle, token_ids)
    for event in events:
        assert event.id == token_ids[event.position]
        if event.position > 0:
            logprob = want[event.position - 1, token_ids[event.position]].item()
            assert abs(event.sampled_logprob - logprob) < 1e-4
        if not event.is_prefill:
            assert event.id == want[event.position - 1].argmax().item()  # greedy


@pytest.mark.parametrize("prompt_length", [LIMIT - 3, LIMIT - 1, LIMIT])
@pytest.mark.parametrize("max_tokens", [2, 3, 4])
def test_a_decode_stops_at_the_limit(
    llama_server, tiny_llama_dir: Path, prompt_length: int, max_tokens: int
) -> None:
    stub = llama_server.stub
    session_id = open_session(stub, max_context=LIMIT)
    events, done = generate(
        stub,
        session_id,
        append_tokens=TOKENS[:prompt_length],
        max_tokens=max_tokens,
        ignore_eos=True,
        logprobs_ranges=[(1, U32_MAX)],
    )
    decoded = min(max_tokens, LIMIT - prompt_length)
    reason = pb.FINISH_REASON_LENGTH if decoded == max_tokens else pb.FINISH_REASON_CONTEXT
    assert (done.prompt_tokens, done.completion_tokens, done.total_tokens) == (
        prompt_length,
        decoded,
        prompt_length + decoded,
    )
    assert done.finish_reason == reason
    assert session_info(stub, session_id).length == done.total_tokens
    token_ids = TOKENS[:prompt_length] + [e.id for e in events if not e.is_prefill]
    assert [e.position for e in events] == list(range(1, done.total_tokens))
    _check(events, token_ids, reference_model(tiny_llama_dir))
    stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))


def test_a_full_session_refuses_more_and_still_scores_forks_and_rewinds(
    llama_server, tiny_llama_dir: Path
) -> None:
    stub, oracle = llama_server.stub, reference_model(tiny_llama_dir)
    free = llama_server.engine.block_manager.num_free
    session_id = open_session(stub, max_context=LIMIT)
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, session_id, append_tokens=TOKENS[: LIMIT + 1])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "CONTEXT_EXCEEDED"
    assert f"{LIMIT + 1} tokens exceed the session's context limit of {LIMIT}" in (
        caught.value.details()
    )
    assert session_info(stub, session_id).length == 0
    generate(stub, session_id, append_tokens=TOKENS[:LIMIT])
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, session_id, append_tokens=[5], offset=LIMIT)
    assert error_reason(caught.value) == "CONTEXT_EXCEEDED"
    events, done = generate(
        stub, session_id, offset=LIMIT, max_tokens=3, logprobs_ranges=[(LIMIT - 3, U32_MAX)]
    )
    assert (done.completion_tokens, done.total_tokens) == (0, LIMIT)
    assert done.finish_reason == pb.FINISH_REASON_CONTEXT
    assert [e.position for e in events] == [LIMIT - 3, LIMIT - 2, LIMIT - 1]
    _check(events, TOKENS[:LIMIT], oracle)

    child = stub.ForkSession(pb.ForkSessionRequest(session_id=session_id)).session_id
    assert session_info(stub, child).max_context == LIMIT
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, child, append_tokens=[5], offset=LIMIT)
    assert error_reason(caught.value) == "CONTEXT_EXCEEDED"
    for target, cut in ((child, LIMIT - 4), (session_id, LIMIT - 2)):
        events, done = generate(
            stub,
            target,
            offset=cut,
            truncating=True,
            append_tokens=[7],
            max_tokens=10,
            ignore_eos=True,
            logprobs_ranges=[(1, U32_MAX)],
        )
        assert (done.prompt_tokens, done.total_tokens) == (cut + 1, LIMIT)
        assert done.finish_reason == pb.FINISH_REASON_CONTEXT
        decoded = [e.id for e in events if not e.is_prefill]
        assert len(decoded) == LIMIT - cut - 1
        _check(events, TOKENS[:cut] + [7] + decoded, oracle)
    for target in (child, session_id):
        stub.CloseSession(pb.CloseSessionRequest(session_id=target))
    assert llama_server.engine.block_manager.num_free == free
