"""How the command line prints the client library's notices beside a streamed reply:
on their own line, never inside the reply's text."""

from __future__ import annotations

import io
import logging
from typing import TextIO


class LineTracking(io.TextIOBase):
    """A text stream passed through, knowing whether its last line is unfinished."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.is_mid_line = False

    def write(self, text: str) -> int:
        if text:
            self.is_mid_line = not text.endswith("\n")
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


class Notices(logging.Handler):
    """The client library's warnings (a lost session replayed, a broken stream resumed)
    as ``salience: ...`` lines on stderr. On a terminal, one that comes in the middle of
    a streamed reply first ends the reply's line; it was printed into the reply. Where
    the reply goes elsewhere (a file, a pipe), its text is left whole."""

    def __init__(self, replies: LineTracking, errors: TextIO) -> None:
        super().__init__(logging.WARNING)
        self.replies = replies
        self.errors = errors

    def emit(self, record: logging.LogRecord) -> None:
        if self.replies.is_mid_line and self.replies.isatty():
            self.replies.write("\n")
            self.replies.flush()
        print(f"salience: {record.getMessage()}", file=self.errors, flush=True)
