"""``JsonDepth``: how deep a JSON text is nested, read one character at a time."""

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
