"""A broken stream resumed with ``decode_start`` goes on as the unbroken call would: its
frequency and presence penalties count the tokens decoded before the break, a seeded call
draws on from where its seed was, and the text its stop strings held back at the break
comes with the next tokens. The break is made as a client leaving a stream (read some
events, cancel); the resumed call is built as the Python client builds it (``StreamProgress.next_request``, whose request
``test_stream_progress.py`` checks). Oracle: the same call unbroken."""

from __future__ import annotations

from typing import Any

import pytest

from salience_client.pb import salience_pb2 as pb
from tests.conftest import RunningServer
from tests.helpers import open_session, random_tokens

PROMPT = random_tokens(12, 3)
BREAK_AFTER = 10


def _call(**options: Any) -> pb.GenerateRequest:
    """The call, greedy with OpenAI's penalties (they depend on every token decoded)."""
    return pb.GenerateRequest(
        max_tokens=24,
        frequency_penalty=1.5,
        presence_penalty=0.7,
        ignore_eos=True,
        return_text=True,
        **options,
    )


def _tokens(stub: Any, request: pb.GenerateRequest, limit: int | None = None) -> list[pb.Token]:
    """The decoded token events of ``request`` (its first ``limit``, then the call is
    left: cancelled, as a client leaves it)."""
    call = stub.Generate(request)
    tokens = []
    for event in call:
        if event.HasField("token") and not event.token.is_prefill:
            tokens.append(event.token)
            if len(tokens) == limit:
                call.cancel()
                break
    return tokens


def _unbroken(stub: Any, **options: Any) -> list[pb.Token]:
    session_id = open_session(stub)
    return _tokens(stub, _call(session_id=session_id, append_tokens=PROMPT, **options))


def _broken_then_resumed(
    stub: Any, with_decode_start: bool, **options: Any
) -> tuple[list[pb.Token], list[pb.Token]]:
    session_id = open_session(stub)
    first = _call(session_id=session_id, append_tokens=PROMPT, **options)
    before = _tokens(stub, first, limit=BREAK_AFTER)
    resumed = _call(session_id=session_id, **options)
    resumed.offset, resumed.truncating = len(PROMPT) + BREAK_AFTER, True
    resumed.max_tokens = first.max_tokens - BREAK_AFTER
    if with_decode_start:
        resumed.decode_start = len(PROMPT)
    return before, _tokens(stub, resumed)


@pytest.mark.parametrize("with_decode_start", [True, False], ids=["resumed", "old-resume"])
def test_a_resumed_stream_goes_on_as_the_unbroken_call(
    llama_server: RunningServer, with_decode_start: bool
) -> None:
    stub = llama_server.stub
    plain = _unbroken(stub)
    # A stop string that the last token before the break begins and nothing completes:
    # that token's text is held back when the stream breaks.
    held = plain[BREAK_AFTER - 1].text
    assert held and held.isprintable(), "pick another prompt: the token has no plain text"
    stop = held + "\u2603\u2603"
    whole = _unbroken(stub, stop_strings=[stop])
    before, after = _broken_then_resumed(stub, with_decode_start, stop_strings=[stop])
    got_ids = [t.id for t in before + after]
    got_text = "".join(t.text for t in before + after)
    want_ids = [t.id for t in whole]
    assert [t.id for t in plain] == want_ids  # the stop string never matched
    if with_decode_start:
        assert got_ids == want_ids
        assert got_text == "".join(t.text for t in whole)
        assert "".join(t.text for t in before) == "".join(t.text for t in whole[:BREAK_AFTER])
    else:  # what a resume without it did: other tokens, the held text lost
        assert got_ids != want_ids


def test_a_resumed_seeded_stream_draws_what_the_unbroken_call_draws(
    llama_server: RunningServer,
) -> None:
    """The seed goes on where the break left it (one uniform per token decoded before
    it), rather than from its start: the resumed tokens are the unbroken call's."""
    stub = llama_server.stub
    sampling = dict(temperature=1.0, top_k=50, top_p=0.95)
    for seed in range(3):
        whole = _unbroken(stub, seed=seed, **sampling)
        before, after = _broken_then_resumed(stub, True, seed=seed, **sampling)
        assert [t.id for t in before + after] == [t.id for t in whole], seed


def test_min_tokens_counts_from_where_the_broken_call_began_decoding(
    llama_server: RunningServer,
) -> None:
    """A stop string in the first tokens, which min_tokens kept from matching in the
    broken call, does not end the resumed one (it ended at once: the client had lowered
    min_tokens to 0, and the tokens read again matched); one completed after the break,
    once min_tokens is met counting from where the call began decoding, ends it where it
    ended the unbroken call (the resumed call counted its own tokens alone)."""
    stub = llama_server.stub
    plain = _unbroken(stub)
    early, late = plain[0].text + plain[1].text, plain[11].text + plain[12].text
    text = "".join(t.text for t in plain)
    assert text.find(late) == len("".join(t.text for t in plain[:11])), "pick another prompt"
    options = {"stop_strings": [early, late], "min_tokens": BREAK_AFTER + 2}
    whole = _unbroken(stub, **options)
    assert len(whole) == 13  # ended by the late one, the early one held off
    before, after = _broken_then_resumed(stub, True, **options)
    assert [t.id for t in before + after] == [t.id for t in whole]
    assert "".join(t.text for t in before + after) == "".join(t.text for t in whole)


def test_a_stop_string_the_broken_call_had_matched_ends_the_resumed_call_at_once(
    llama_server: RunningServer,
) -> None:
    """The break came after the token completing a stop string, before its Done: the
    resumed call ends at once, finish stop_string, nothing more decoded."""
    stub = llama_server.stub
    plain = _unbroken(stub)
    stop = plain[BREAK_AFTER - 2].text + plain[BREAK_AFTER - 1].text
    assert stop.isprintable() and stop not in "".join(t.text for t in plain[: BREAK_AFTER - 1])
    session_id = open_session(stub)
    first = _call(session_id=session_id, append_tokens=PROMPT)  # decodes past it
    _tokens(stub, first, limit=BREAK_AFTER)
    resumed = _call(session_id=session_id, stop_strings=[stop], decode_start=len(PROMPT))
    resumed.offset, resumed.truncating = len(PROMPT) + BREAK_AFTER, True
    events = list(stub.Generate(resumed))
    done = events[-1].done
    assert done.finish_reason == pb.FINISH_REASON_STOP_STRING and done.completion_tokens == 0
    assert done.stop_string == stop and done.total_tokens == len(PROMPT) + BREAK_AFTER


def test_a_decode_start_past_the_prompt_is_refused(llama_server: RunningServer) -> None:
    import grpc

    from tests.helpers import error_reason

    session_id = open_session(llama_server.stub)
    request = _call(session_id=session_id, append_tokens=PROMPT, decode_start=len(PROMPT) + 1)
    with pytest.raises(grpc.RpcError) as caught:
        list(llama_server.stub.Generate(request))
    assert error_reason(caught.value) == "INVALID_RANGE"


def test_a_resume_reads_again_only_what_its_stop_strings_may_span(
    llama_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tokens are read again under the engine's lock: a resume far from where its
    call began decoding (a long generation) read them all, stalling every stream."""
    from salience_server.engine.detokenizer import IncrementalDetokenizer
    from salience_server.engine.intake import RESUME_TAIL_BYTES

    stub = llama_server.stub
    session_id = open_session(stub)
    list(stub.Generate(pb.GenerateRequest(session_id=session_id, append_tokens=PROMPT * 40)))
    pushed = []
    push = IncrementalDetokenizer.push
    monkeypatch.setattr(
        IncrementalDetokenizer,
        "push",
        lambda self, token_id: pushed.append(token_id) or push(self, token_id),
    )
    resumed = _call(session_id=session_id, stop_strings=["xy"], decode_start=0)
    resumed.offset, resumed.truncating, resumed.max_tokens = len(PROMPT) * 40, True, 0
    list(stub.Generate(resumed))
    assert len(pushed) == RESUME_TAIL_BYTES * 2  # not the 480 since decode_start


@pytest.mark.parametrize("num_digits", [14, BREAK_AFTER], ids=["midway", "at-its-end"])
def test_a_resumed_constrained_stream_goes_on_in_its_grammar(
    llama_server: RunningServer, num_digits: int
) -> None:
    """The grammar reads the broken call's tokens again: the resumed call goes on where
    the broken one was in it (it started the grammar again: a second match began after
    the first one's start), and one the break came after the grammar's end ends at once,
    finish stop, nothing more decoded (a whole second match followed)."""
    stub = llama_server.stub
    options = {"constraint": pb.Constraint(regex=f"[0-9]{{{num_digits}}}")}
    whole = _unbroken(stub, **options)
    assert len(whole) == num_digits and all(t.text.isdigit() for t in whole)
    session_id = open_session(stub)
    first = _call(session_id=session_id, append_tokens=PROMPT, **options)
    before = _tokens(stub, first, limit=BREAK_AFTER)
    resumed = _call(session_id=session_id, decode_start=len(PROMPT), **options)
    resumed.offset, resumed.truncating = len(PROMPT) + BREAK_AFTER, True
    events = list(stub.Generate(resumed))
    after = [e.token for e in events if e.HasField("token") and not e.token.is_prefill]
    assert [t.id for t in before + after] == [t.id for t in whole]
    done = events[-1].done
    assert done.finish_reason == pb.FINISH_REASON_STOP
    assert done.completion_tokens == num_digits - BREAK_AFTER


def test_a_resume_whose_tokens_break_the_grammar_fails_clearly(
    llama_server: RunningServer,
) -> None:
    """A decode_start naming tokens the constraint cannot have made: the call fails
    CONSTRAINT_FAILED, as one whose grammar the engine cannot follow does, saying so."""
    import grpc

    from tests.helpers import error_reason

    session_id = open_session(llama_server.stub)
    request = _call(
        session_id=session_id,
        append_tokens=PROMPT,
        decode_start=len(PROMPT) - 3,
        constraint=pb.Constraint(regex="[0-9]{4}"),
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(llama_server.stub.Generate(request))
    assert error_reason(caught.value) == "CONSTRAINT_FAILED"
    assert "a token decoded before decode_start's resume: token" in caught.value.details()
