"""Grammar-constrained decoding through a real server (SPEC 2.1 ``constraint``)."""

from __future__ import annotations

import json
import logging
import re

import grpc
import pytest

from salience_client.pb import salience_pb2 as pb
from tests.helpers import error_reason, generate, open_session, random_tokens, reference_logprobs
from tests.tiny_models import build_tokenizer, reference_model

TOLERANCE = 1e-4


def _text(token_ids: list[int]) -> str:
    return build_tokenizer().decode(token_ids)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_regex_output_matches_and_ends_when_complete(llama_server, temperature) -> None:
    tokens, done = generate(
        llama_server.stub,
        open_session(llama_server.stub),
        append_tokens=random_tokens(6, seed=31),
        max_tokens=20,
        temperature=temperature,
        seed=3,
        constraint=pb.Constraint(regex="[0-9]{3}-[a-c]{2}"),
    )
    assert re.fullmatch("[0-9]{3}-[a-c]{2}", _text([t.id for t in tokens]))
    assert done.finish_reason == pb.FINISH_REASON_STOP and done.completion_tokens == 6


def test_a_lark_grammar_with_a_json_schema_rule(llama_server) -> None:
    """``Constraint.lark``: two JSON objects of the schema, joined by "|" (a grammar
    around JSON, as the shim's forced parallel tool calls are)."""
    schema = {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]}
    layout = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    grammar = 'start: item "|" item\nitem: %json ' + json.dumps({**schema, "x-guidance": layout})
    tokens, done = generate(
        llama_server.stub,
        open_session(llama_server.stub),
        append_tokens=random_tokens(6, seed=32),
        max_tokens=60,
        constraint=pb.Constraint(lark=grammar),
    )
    first, second = _text([t.id for t in tokens]).split("|")
    assert json.loads(first)["a"] in (1, 2) and json.loads(second)["a"] in (1, 2)
    assert done.finish_reason == pb.FINISH_REASON_STOP


def test_json_schema_output_validates_and_logprobs_stay_raw(llama_server, tiny_llama_dir) -> None:
    schema = {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "ok": {"type": "boolean"},
        },
        "required": ["id", "ok"],
        "additionalProperties": False,
    }
    prompt = random_tokens(5, seed=32)
    tokens, done = generate(
        llama_server.stub,
        open_session(llama_server.stub),
        append_tokens=prompt,
        max_tokens=60,
        constraint=pb.Constraint(json_schema=json.dumps(schema)),
    )
    value = json.loads(_text([t.id for t in tokens]))
    assert set(value) == {"id", "ok"} and isinstance(value["id"], int)
    assert isinstance(value["ok"], bool) and done.finish_reason == pb.FINISH_REASON_STOP
    reference = reference_logprobs(reference_model(tiny_llama_dir), prompt + [t.id for t in tokens])
    for token in tokens:  # the mask shapes the choice, not the reported distribution
        assert (
            abs(token.sampled_logprob - reference[token.position - 1, token.id].item()) < TOLERANCE
        )


@pytest.mark.parametrize(
    ("constraint", "says"),
    [
        (pb.Constraint(json_schema='{"type": "nonsense"}'), "nonsense"),
        # Asking for nothing decoded unconstrained, hiding the client's mistake.
        (pb.Constraint(), "sets none of"),
        (pb.Constraint(json_object=False), "must be true"),
    ],
    ids=["not-compiling", "empty", "json-object-false"],
)
def test_a_constraint_that_does_not_compile_changes_nothing(llama_server, constraint, says) -> None:
    session_id = open_session(llama_server.stub)
    generate(llama_server.stub, session_id, append_tokens=[1, 2, 3])
    with pytest.raises(grpc.RpcError) as caught:
        generate(
            llama_server.stub,
            session_id,
            offset=3,
            append_tokens=[4],
            max_tokens=3,
            constraint=constraint,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "INVALID_CONSTRAINT"
    assert says in caught.value.details()
    info = llama_server.stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session
    assert info.length == 3


def test_a_constraint_past_the_matchers_limits_is_refused_before_anything(default_server) -> None:
    """A regex whose lexer outgrows llguidance's limits on a real vocabulary passes its
    validation and failed the first mask: INTERNAL, with the append committed. It is
    refused as not compiling, the session untouched."""
    session_id = open_session(default_server.stub)
    generate(default_server.stub, session_id, append_tokens=[1, 2, 3])
    with pytest.raises(grpc.RpcError) as caught:
        generate(
            default_server.stub,
            session_id,
            offset=3,
            append_tokens=[4, 5, 6],
            max_tokens=5,
            constraint=pb.Constraint(regex="(a|b)*" * 5000),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "INVALID_CONSTRAINT"
    assert "lexer" in caught.value.details()
    info = default_server.stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session
    assert info.length == 3


def test_a_constraint_failing_while_decoding_is_the_requests_error(
    default_server, caplog: pytest.LogCaptureFixture
) -> None:
    """A JSON schema whose ``pattern`` outgrows the lexer's limits only once decoding
    enters the string: CONSTRAINT_FAILED, with a short message (it was REQUEST_FAILED
    quoting the whole grammar, hundreds of kilobytes, logged with a traceback). The log
    says which request failed, not the grammar engine's words (they may name tokens)."""
    caplog.set_level(logging.INFO)
    session_id = open_session(default_server.stub)
    schema = json.dumps({"type": "string", "pattern": "(a|b)*" * 5000})
    with pytest.raises(grpc.RpcError) as caught:
        generate(
            default_server.stub,
            session_id,
            append_tokens=[1, 2, 3],
            max_tokens=5,
            constraint=pb.Constraint(json_schema=schema),
        )
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert error_reason(caught.value) == "CONSTRAINT_FAILED"
    assert "lexer" in caught.value.details() and len(caught.value.details()) < 600
    failed = [r.getMessage() for r in caplog.records if "constraint" in r.getMessage()]
    assert failed and all("lexer" not in message for message in failed), failed


def test_a_tokenizer_longer_than_the_vocabulary_still_takes_grammars(
    tiny_llama_dir, server_factory, tmp_path
) -> None:
    """A tokenizer with a token past the model's vocabulary (the grammar engine refused
    that, and the call failed UNKNOWN): the constraint holds as on the plain model."""
    import shutil

    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(["<past-the-vocabulary>"])
    tokenizer.save_pretrained(model_dir)
    server = server_factory(model_dir)
    assert len(server.engine.tokenizer) == server.engine.vocab_size + 1
    tokens, done = generate(
        server.stub,
        open_session(server.stub),
        append_tokens=random_tokens(6, seed=31),
        max_tokens=20,
        constraint=pb.Constraint(regex="[0-9]{3}-[a-c]{2}"),
    )
    assert re.fullmatch("[0-9]{3}-[a-c]{2}", _text([t.id for t in tokens]))
    assert done.finish_reason == pb.FINISH_REASON_STOP
    # A grammar whose text only that token spells (llguidance keeps added tokens whole):
    # refused when compiled, not failed while decoding.
    with pytest.raises(grpc.RpcError) as refused:
        generate(
            server.stub,
            open_session(server.stub),
            append_tokens=[5],
            max_tokens=4,
            constraint=pb.Constraint(regex="<past-the-vocabulary>"),
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(refused.value) == "INVALID_CONSTRAINT"
    assert "no token of the model's vocabulary" in refused.value.details()


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_stop_tokens_min_tokens_holds_back_are_out_of_the_constraints_choices(
    llama_server, temperature, caplog: pytest.LogCaptureFixture
) -> None:
    """Before ``min_tokens``, the stop tokens are held back from what the constraint
    allows: the reply keeps to both (the digits 1-9 stop the call, so only 0 is left).
    A constraint that then allows nothing else fails the call, CONSTRAINT_FAILED
    naming min_tokens: greedy, it took token 0, which broke the grammar ("token 0 breaks
    the grammar"); sampled, it failed as the server's fault (REQUEST_FAILED, INTERNAL,
    logged at ERROR with its traceback)."""
    stub, tokenizer = llama_server.stub, build_tokenizer()
    digits = [tokenizer.convert_tokens_to_ids(str(digit)) for digit in range(1, 10)]
    tokens, done = generate(
        stub,
        open_session(stub),
        append_tokens=random_tokens(6, seed=33),
        max_tokens=10,
        min_tokens=3,
        stop_token_ids=digits,
        temperature=temperature,
        seed=5,
        constraint=pb.Constraint(regex="[0-9]{3}"),
    )
    assert _text([t.id for t in tokens]) == "000" and done.finish_reason == pb.FINISH_REASON_STOP
    session_id = open_session(stub)
    with pytest.raises(grpc.RpcError) as caught:
        generate(
            stub,
            session_id,
            append_tokens=random_tokens(6, seed=33),
            max_tokens=10,
            min_tokens=2,
            stop_token_ids=[tokenizer.convert_tokens_to_ids("a")],
            temperature=temperature,
            seed=5,
            constraint=pb.Constraint(regex="ab"),
        )
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert error_reason(caught.value) == "CONSTRAINT_FAILED"
    assert "allows only stop tokens next, which min_tokens (2) holds back" in (
        caught.value.details()
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
