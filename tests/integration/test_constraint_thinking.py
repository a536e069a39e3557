"""A constraint that leaves a reasoning model's thinking free (``Constraint``'s thinking
tokens): the thinking decodes as if unconstrained, then the answer follows the grammar
as a constrained call on the prompt and that thinking would. The tiny model has no
thinking tags: tokens its greedy output holds stand for them. Oracles: the unconstrained
call, and the constrained call made on the prompt with the thinking appended."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from salience_client.pb import salience_pb2 as pb
from tests.helpers import error_reason, generate, open_session, random_tokens

PROMPT = random_tokens(8, seed=41)
REGEX = "[0-9]{4}"


def _ids(stub: Any, append_tokens: list[int], **options: Any) -> tuple[list[int], pb.Done]:
    tokens, done = generate(
        stub, open_session(stub), append_tokens=append_tokens, max_tokens=12, **options
    )
    return [t.id for t in tokens], done


def _thinking_end(free: list[int]) -> int:
    """Where a token stands for the thinking's end: the first of the free output, from
    its third on, that it holds for the first time (it must not end the thinking before)."""
    for index in range(2, len(free)):
        if free[index] not in free[:index]:
            return index
    raise AssertionError("pick another prompt")


@pytest.mark.parametrize("opens", [False, True], ids=["starts-inside", "opens-with-start-token"])
def test_the_thinking_is_free_and_the_answer_follows_the_grammar(
    llama_server: Any, opens: bool
) -> None:
    stub = llama_server.stub
    free, _ = _ids(stub, PROMPT, ignore_eos=True)
    end_at = _thinking_end(free)
    thinking = free[: end_at + 1]  # the end token included
    constraint = pb.Constraint(regex=REGEX, thinking_end_token=free[end_at])
    if opens:  # the reply's first token opens the thinking
        constraint.thinking_start_token = free[0]
    got, done = _ids(stub, PROMPT, ignore_eos=True, constraint=constraint)
    answer, answer_done = _ids(
        stub, PROMPT + thinking, ignore_eos=True, constraint=pb.Constraint(regex=REGEX)
    )
    assert got == thinking + answer
    assert done.finish_reason == answer_done.finish_reason == pb.FINISH_REASON_STOP
    assert len(answer) == 4


@pytest.mark.parametrize("bias", [100.0, -100.0], ids=["thinks", "answers-at-once"])
def test_with_a_start_token_the_reply_may_think_or_answer_at_once(
    llama_server: Any, bias: float
) -> None:
    """The first token may be the start token (pushed there by a bias) or one the
    grammar allows (the start token pushed away): then the grammar applies from the
    first token, as without thinking tokens."""
    stub = llama_server.stub
    free, _ = _ids(stub, PROMPT, ignore_eos=True)
    start = 250  # a token the model would not choose first, but for the bias
    assert free[0] != start
    constraint = pb.Constraint(
        regex=REGEX, thinking_start_token=start, thinking_end_token=free[_thinking_end(free)]
    )
    got, _ = _ids(stub, PROMPT, ignore_eos=True, constraint=constraint, logit_bias={start: bias})
    plain, _ = _ids(
        stub,
        PROMPT,
        ignore_eos=True,
        constraint=pb.Constraint(regex=REGEX),
        logit_bias={start: bias},
    )
    if bias > 0:
        assert got[0] == start and got != plain
    else:
        assert got == plain and len(plain) == 4


def test_a_start_token_without_an_end_is_refused(llama_server: Any) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _ids(
            llama_server.stub,
            PROMPT,
            constraint=pb.Constraint(regex=REGEX, thinking_start_token=5),
        )
    assert error_reason(caught.value) == "INVALID_CONSTRAINT"
    with pytest.raises(grpc.RpcError) as caught:
        _ids(
            llama_server.stub,
            PROMPT,
            constraint=pb.Constraint(regex=REGEX, thinking_end_token=10**6),
        )
    assert error_reason(caught.value) == "INVALID_TOKEN"


@pytest.mark.parametrize("where", ["in-the-thinking", "in-the-answer"])
def test_a_resumed_stream_goes_on_through_the_thinking_and_the_grammar(
    llama_server: Any, where: str
) -> None:
    """A stream broken inside the thinking, or inside the answer, resumed with
    ``decode_start`` (as the client resumes it): the thinking's state and the
    grammar's are read again from the tokens decoded before, so the whole equals the
    unbroken call."""
    stub = llama_server.stub
    free, _ = _ids(stub, PROMPT, ignore_eos=True)
    end_at = _thinking_end(free)
    constraint = pb.Constraint(
        regex=REGEX, thinking_start_token=free[0], thinking_end_token=free[end_at]
    )
    whole, _ = _ids(stub, PROMPT, ignore_eos=True, constraint=constraint)
    break_after = 2 if where == "in-the-thinking" else end_at + 3
    session_id = open_session(stub)
    first = stub.Generate(
        pb.GenerateRequest(
            session_id=session_id,
            append_tokens=PROMPT,
            max_tokens=12,
            ignore_eos=True,
            constraint=constraint,
        )
    )
    before = []
    for event in first:
        if event.HasField("token"):
            before.append(event.token.id)
            if len(before) == break_after:
                first.cancel()
                break
    after, done = generate(
        stub,
        session_id,
        offset=len(PROMPT) + break_after,
        truncating=True,
        max_tokens=12 - break_after,
        ignore_eos=True,
        constraint=constraint,
        decode_start=len(PROMPT),
    )
    assert before + [t.id for t in after] == whole
    assert done.finish_reason == pb.FINISH_REASON_STOP
