"""``Done.stop_string`` names the stop string that ended the call, and is empty for any
other end (the proto's word): a stop token that ends a call keeps its finish reason
even where the text its end releases matches a stop string."""

from __future__ import annotations

from salience_client.pb import salience_pb2 as pb
from tests.conftest import RunningServer
from tests.helpers import generate, open_session


def test_a_stop_token_s_end_names_no_stop_string(llama_server: RunningServer) -> None:
    """The stop token is a UTF-8 lead byte: kept in the text (``include_stop_string``),
    the call's end writes it as U+FFFD, which the stop string U+FFFD matches. The call
    still ended on the stop token (``min_tokens`` keeps it from being drawn first)."""
    stub = llama_server.stub
    lead_byte = stub.Tokenize(pb.TokenizeRequest(text="é")).token_ids[0]
    tokens, done = generate(
        stub,
        open_session(stub),
        append_tokens=[1, 2],
        max_tokens=5,
        min_tokens=1,
        stop_token_ids=[lead_byte],
        logit_bias={lead_byte: 100.0},
        stop_strings=["\ufffd"],
        include_stop_string=True,
        return_text=True,
    )
    assert tokens[-1].id == lead_byte and tokens[-1].text == "\ufffd"
    assert done.finish_reason == pb.FINISH_REASON_STOP
    assert done.stop_string == ""


def test_a_stop_string_s_end_names_it(llama_server: RunningServer) -> None:
    stub = llama_server.stub
    lead_byte = stub.Tokenize(pb.TokenizeRequest(text="é")).token_ids[0]
    tokens, done = generate(
        stub,
        open_session(stub),
        append_tokens=[1, 2],
        max_tokens=1,
        logit_bias={lead_byte: 100.0},
        stop_strings=["\ufffd"],
        return_text=True,
    )
    assert done.finish_reason == pb.FINISH_REASON_STOP_STRING
    assert done.stop_string == "\ufffd" and tokens[-1].text == ""
