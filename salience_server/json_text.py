"""Text that came through JSON: valid Unicode or not.

JSON can escape a lone UTF-16 surrogate (``"\\ud800"``), which Python's ``json`` decodes
into a ``str`` that no UTF-8 encoder, tokenizer or protobuf string field accepts. Both
the server (chat messages, tools and template variables sent as JSON) and the HTTP shim
(request bodies) refuse such text up front as bad input, naming where it is.
"""

from __future__ import annotations

from typing import Any


def lone_surrogate_path(value: Any, path: str = "") -> str | None:
    """Where in a decoded JSON ``value`` the first string (or key) holding a lone
    surrogate is (``messages[0].content``; ``""`` for the value itself), else None."""
    if isinstance(value, str):
        return None if _is_unicode(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not _is_unicode(key):
                return path
            found = lone_surrogate_path(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = lone_surrogate_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
