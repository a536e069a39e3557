"""How ``salience chat`` reads a message: a line, or lines continued with a backslash."""

from __future__ import annotations

import io

from salience_client.cli import read_message


def test_a_line_ending_in_a_backslash_goes_on_to_the_next() -> None:
    lines = io.StringIO("one\\\ntwo\\\r\nthree\nfour\nfive\\")
    assert read_message(lines, False) == "one\ntwo\nthree\n"
    assert read_message(lines, False) == "four\n"
    assert read_message(lines, False) == "five\n"  # the input ended: what was read goes
    assert read_message(lines, False) is None


def test_a_backslash_inside_a_line_is_text() -> None:
    assert read_message(io.StringIO("a \\ b\n"), False) == "a \\ b\n"
