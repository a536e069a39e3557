"""``Done.stop_string`` names the stop string that ended the call, and is empty for any
other end (the proto's word): a stop token that ends a call keeps its finish reason
even where the text its end releases matches a stop string."""

from __future__ import annotations

from typing import Any

from salience_client.pb import salience_pb2 as pb
from tests.conftest import RunningServer
from tests.helpers import generate, open_session


def test_a_stop_token_s_end_names_no_stop_string(llama_server: RunningServer) -> None:
    """The stop token is a UTF-8 lead byte: kept in the text (``include_stop_string``),
    the call's end writes it as U+FFFD, which the stop string U+FFFD matches. The call
    still ended on the stop token (``min_tokens`` keeps it from being drawn first)."""
    lead_byte = _lead_byte(llama_server)
    tokens, done = _forced(
        llama_server,
        max_tokens=5,
        min_tokens=1,
        stop_token_ids=[lead_byte],
        include_stop_string=True,
    )
    assert tokens[-1].id == lead_byte and tokens[-1].text == "\ufffd"
    assert done.finish_reason == pb.FINISH_REASON_STOP
    assert done.stop_string == ""


def test_a_stop_string_s_end_names_it(llama_server: RunningServer) -> None:
    tokens, done = _forced(llama_server, max_tokens=1)
    assert done.finish_reason == pb.FINISH_REASON_STOP_STRING
    assert done.stop_string == "\ufffd" and tokens[-1].text == ""


def _lead_byte(server: RunningServer) -> int:
    """The token of "é"'s first UTF-8 byte alone (its text is U+FFFD until the next)."""
    return int(server.stub.Tokenize(pb.TokenizeRequest(text="é")).token_ids[0])


def _forced(server: RunningServer, **options: Any) -> tuple[list[pb.Token], pb.Done]:
    """A call on a fresh session whose first token is forced to be ``_lead_byte``, with
    the stop string U+FFFD."""
    stub, lead_byte = server.stub, _lead_byte(server)
    return generate(  # type: ignore[no-any-return]
        stub,
        open_session(stub),
        append_tokens=[1, 2],
        logit_bias={lead_byte: 100.0},
        stop_strings=["\ufffd"],
        return_text=True,
        **options,
    )
