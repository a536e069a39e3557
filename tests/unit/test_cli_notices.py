"""The ``salience`` chat's notices: the client library's warnings on lines of their own."""

from __future__ import annotations

import io
import logging

import grpc

from salience_client.cli_notices import LineTracking, Notices
from salience_client.failover import log_resume
from salience_client.pb import salience_pb2 as pb
from salience_client.stream_progress import StreamProgress
from salience_client.types import SalienceClientError

NOTICE = "salience: session s1: the stream broke after 0 decoded tokens (UNAVAILABLE); resuming\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _reply_with_a_resume_in_the_middle(out: io.StringIO, errors: io.StringIO) -> None:
    """Streams "Hel" to ``out``, the client resumes a broken stream, then "lo"."""
    replies = LineTracking(out)
    notices = Notices(replies, errors)
    client_log = logging.getLogger("salience_client")
    client_log.addHandler(notices)
    try:
        replies.write("Hel")
        broken = SalienceClientError(grpc.StatusCode.UNAVAILABLE, "", "reset")
        log_resume("s1", broken, StreamProgress(pb.GenerateRequest()))
        replies.write("lo\n")
    finally:
        client_log.removeHandler(notices)


def test_a_notice_in_the_middle_of_a_reply_gets_a_line_of_its_own_on_a_terminal() -> None:
    """The last-resort handler printed it into the reply: "Helsession s1: ...lo"."""
    terminal = _Terminal()  # stdout and stderr, as a terminal shows them
    _reply_with_a_resume_in_the_middle(terminal, terminal)
    assert terminal.getvalue() == f"Hel\n{NOTICE}lo\n"


def test_a_reply_going_to_a_file_stays_whole() -> None:
    out, errors = io.StringIO(), io.StringIO()
    _reply_with_a_resume_in_the_middle(out, errors)
    assert out.getvalue() == "Hello\n" and errors.getvalue() == NOTICE
