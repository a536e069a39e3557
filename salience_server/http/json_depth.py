"""``JsonDepth``: how deep a JSON text is nested, read one character at a time; and
``value_end``: where the JSON object or list a text opens with closes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class JsonDepth:
    """Tracks how deep a JSON text is nested, char by char (strings and escapes aware):
    where a value that opened with ``{`` or ``[`` closes, while it streams."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False

    def feed(self, char: str) -> None:
        """Reads the next character."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
        elif char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1


def value_end(text: str) -> int | None:
    """The index just after the JSON object or list ``text`` opens with; 0 where it
    opens none, None where it has not closed yet."""
    if not text.startswith(("{", "[")):
        return 0
    scanner = JsonDepth()
    for position, char in enumerate(text):
        scanner.feed(char)
        if scanner.depth == 0:
            return position + 1
    return None
