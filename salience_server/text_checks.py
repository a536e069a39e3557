"""Checks on clients' text before it is tokenized, shared by the server and the shim.

- JSON can escape a lone UTF-16 surrogate (``"\\ud800"``), which Python's ``json``
  decodes into a ``str`` that no UTF-8 encoder, tokenizer or protobuf string field
  accepts. Both the server (chat messages, tools and template variables sent as JSON)
  and the HTTP shim (request bodies) refuse such text as bad input, naming where it is.
- A prompt too long for the context is only known to be so once tokenized, which takes
  about a second a megabyte here: a client that sends tens of megabytes would wait past
  its deadline for the refusal, and the tokenizer would run on after it. No token spans
  more than ``MAX_CHARS_PER_TOKEN`` characters, so a text longer than that many per
  context token is refused at once.
- JSON nested past ``MAX_JSON_DEPTH`` is refused as it is read (``load_json``): the code
  that walks it (these checks, pydantic, jsonschema, chat templates) recurses, and
  Python's recursion limit turned a few kilobytes of brackets into a 500.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

IMAGE_PLACE = "<|vision_start|><|image_pad|><|vision_end|>"
"""The text that places an image in a chat message (Qwen2-VL's tokens): the one run of
special strings a message may carry as tokens (any other is read as text)."""

MAX_JSON_DEPTH = 100
"""Nesting levels of arrays and objects in any JSON a client sends (a tool's schema at
the bottom of a request body has room for about 90)."""


class JSONTooDeep(ValueError):
    """JSON nested more than MAX_JSON_DEPTH levels."""

    def __init__(self) -> None:
        super().__init__(f"it is nested more than {MAX_JSON_DEPTH} levels deep")


def load_json(text: str | bytes) -> Any:
    """``json.loads`` that raises JSONTooDeep past MAX_JSON_DEPTH levels (a ValueError,
    as the decoding errors are)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise JSONTooDeep() from None
    level = [value]
    for _ in range(MAX_JSON_DEPTH):
        level = [
            item
            for node in level
            if isinstance(node, dict | list)
            for item in (node.values() if isinstance(node, dict) else node)
        ]
        if not level:
            return value
    if any(isinstance(node, dict | list) for node in level):
        raise JSONTooDeep()
    return value


def lone_surrogate_path(value: Any, raw: str | bytes | None = None) -> str | None:
    """Where in a decoded JSON ``value`` the first string (or key) holding a lone
    surrogate is (``messages[0].content``; ``""`` for the value itself), else None.
    ``raw``: the JSON text ``value`` was read from, scanned first: only a ``\\uD800``
    to ``\\uDFFF`` escape writes a surrogate (UTF-8 cannot), and a text without one
    is not walked (seconds for millions of token ids)."""
    if raw is not None and not _may_hold(_SURROGATE_ESCAPE, raw):
        return None
    return _first_path(value, lambda item: isinstance(item, str) and not _is_unicode(item))


def non_finite_path(value: Any, raw: str | bytes | None = None) -> str | None:
    """Where in a decoded JSON ``value`` the first NaN or infinity is (Python's reader
    takes ``NaN`` and ``Infinity``, which are no JSON, and no reply echoing them can be
    written), in ``lone_surrogate_path``'s notation, else None. ``raw``, as there: only
    those words, an exponent of three digits or a run of 200 digits (with a two-digit
    exponent, 1e299 at most) read as infinite."""
    if raw is not None and not _may_hold(_NON_FINITE, raw):
        return None
    return _first_path(value, lambda item: isinstance(item, float) and not math.isfinite(item))


_SURROGATE_ESCAPE = r"\\u[dD][89a-fA-F]"
_NON_FINITE = r"NaN|Infinity|[eE]\+?[0-9]{3}|[0-9]{200}"


def _may_hold(pattern: str, raw: str | bytes) -> bool:
    """Whether ``pattern`` occurs in ``raw`` (a text or its UTF-8 bytes)."""
    if isinstance(raw, bytes):
        return re.search(pattern.encode(), raw) is not None
    return re.search(pattern, raw) is not None


def _first_path(value: Any, is_bad: Callable[[Any], bool], path: str = "") -> str | None:
    """Where in a decoded JSON ``value`` the first item or key ``is_bad`` holds for is
    (a key's: the object's path), else None."""
    if is_bad(value):
        return path
    if isinstance(value, dict):
        for key, item in value.items():
            if is_bad(key):
                return path
            found = _first_path(item, is_bad, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_path(item, is_bad, f"{path}[{index}]")
            if found is not None:
                return found
    return None


MAX_CHARS_PER_TOKEN = 256
"""More characters than any token spans (SmolLM2's longest token, a run of spaces,
spans 81 bytes; a character is at least one byte)."""

MAX_EMBED_INPUTS = 2048
"""Inputs of one Embed call at most: the server's limit, which the shim checks before it
tokenizes any (with ``truncate_prompt_tokens`` it tokenizes each text itself)."""


def cannot_fit(num_chars: int, max_context: int) -> bool:
    """Whether a text of ``num_chars`` characters is surely more tokens than
    ``max_context``, whatever the tokenizer."""
    return num_chars > max_context * MAX_CHARS_PER_TOKEN


def text_length(value: Any) -> int:
    """The characters of every string in a decoded JSON ``value`` (keys left out)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_length(item) for item in value.values())
    if isinstance(value, list):
        return sum(text_length(item) for item in value)
    return 0


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
