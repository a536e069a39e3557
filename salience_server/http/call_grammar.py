"""``CallGrammar``: the Lark grammar of a ``required`` reply, calls of the declared tools
in the family's markup.

A family's markers may be special tokens of its tokenizer (DeepSeek's, Mistral v11's),
whose text no quoted string of a grammar stands for: the grammar engine matches a
special token only by its id. Each marker that is one token of the served model's is
written ``<[id]>`` (llguidance's token reference); the others stay quoted text. Where
the markers between and after calls are special tokens and one is not a token of its
own, the grammar holds one call, closed by nothing, the model's end ending it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from salience_server.http.tool_format import ToolFormat

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How the grammar engine lays out a JSON rule of a Lark grammar: as the server lays out
a ``json_schema`` constraint's output (``engine.constraints.JSON_LAYOUT``), compact, as
``json.dumps`` writes it."""


def json_rule(schema: dict[str, Any]) -> str:
    """A Lark rule's body: a JSON value of ``schema``, laid out as ``json.dumps`` does."""
    return f"%json {json.dumps({**schema, 'x-guidance': JSON_LAYOUT})}"


@dataclass(frozen=True)
class CallGrammar:
    """How a forced reply's grammar writes one family's markup for one model."""

    format: ToolFormat
    marker_ids: Mapping[str, int] = field(default_factory=dict)
    """The token id of each of the format's markers that is one token of the model's
    tokenizer (``Backend.marker_tokens``); a marker not here is written as text."""

    def spell(self, text: str) -> str:
        """``text`` as a Lark sequence: each marker that is one token as its id
        (``<[id]>``), what stands around them as quoted strings."""
        return " ".join(self._items(text))

    def optional(self, text: str) -> str:
        """``text`` (spelled), which may be left out."""
        items = self._items(text)
        return f"{items[0]}?" if len(items) == 1 else f"({' '.join(items)})?"

    def _items(self, text: str) -> list[str]:
        """The Lark items that spell ``text``, its single-token markers split out."""
        if not self.marker_ids:
            return [json.dumps(text)]
        markers = sorted(self.marker_ids, key=len, reverse=True)
        pieces = re.split(f"({'|'.join(map(re.escape, markers))})", text)
        return [
            f"<[{self.marker_ids[piece]}]>" if piece in self.marker_ids else json.dumps(piece)
            for piece in pieces
            if piece
        ]

    @property
    def can_chain(self) -> bool:
        """Whether the grammar can write the text between two calls (and after the
        last): the format writes several calls, and where its markers are special
        tokens, each there is one token."""
        fmt = self.format
        if not fmt.separator:
            return False
        written = fmt.separator + fmt.closing
        needed = [marker for marker in fmt.markers if marker in written]
        return not fmt.has_token_markers or all(m in self.marker_ids for m in needed)

    def chained(self, max_calls: int) -> str:
        """The start rule of one to ``max_calls`` calls (the ``call`` rule), separated
        as the family writes them, the closing after the last optional."""
        fmt = self.format
        close = f" {self.optional(fmt.closing)}" if fmt.closing else ""
        return f"start: call ({self.spell(fmt.separator)} call){{0,{max_calls - 1}}}{close}\n"

    def named_calls(self, parameters: dict[str, dict[str, Any]], max_calls: int) -> str:
        """Calls of the functions of ``parameters`` (name -> arguments' schema) where the
        name is outside the JSON: the call's head (its name as the family writes it),
        then its arguments; up to ``max_calls`` where the grammar can chain them, one
        otherwise."""
        rules = [
            f"call_{index}: {self.spell(self.format.head(name))} {json_rule(parameters[name])}"
            for index, name in enumerate(sorted(parameters))
        ]
        alternatives = " | ".join(f"call_{index}" for index in range(len(rules)))
        if max_calls > 1 and self.can_chain:
            return self.chained(max_calls) + "\n".join([f"call: {alternatives}", *rules]) + "\n"
        return "\n".join([f"start: {alternatives}", *rules]) + "\n"
