"""Request fields the shim refuses rather than keeps: unknown fields are kept and
ignored (clients send vendor extras), but ignoring these would answer something else
than was asked."""

from __future__ import annotations

from typing import Any

from salience_server.http.errors import unsupported

_UNOFFERED = {
    "functions": "the legacy functions API (use tools)",
    "function_call": "the legacy functions API (use tool_choice)",
    "audio": "audio output",
    "web_search_options": "web search",
    "prediction": "predicted outputs",
    "chat_template": "a chat template sent with the request",
}
"""Fields of a request asking for what this server does not do: unknown fields are
kept and ignored, but ignoring these would answer something else than was asked (a
forced ``function_call`` answered with plain text)."""


def refuse_unoffered(extra: dict[str, Any]) -> None:
    """400 for a field in ``_UNOFFERED`` (or output ``modalities`` other than text)."""
    for name, what in _UNOFFERED.items():
        if extra.get(name) is not None:
            raise unsupported(what, name)
    modalities = extra.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise unsupported("output modalities other than text", "modalities")


CHAT_ONLY = {
    "messages": "send them as input",
    "max_tokens": "use max_output_tokens",
    "max_completion_tokens": "use max_output_tokens",
    "stop": "only Chat Completions and Completions take stop strings",
    "n": "make one request per reply",
}
"""Chat Completions fields that a request ported to the Responses API may still carry,
where OpenAI refuses them as unknown: the shim keeps unknown fields, so these did
nothing and said nothing (no stop, one reply)."""


UNOFFERED_SAMPLING = {
    "allowed_token_ids": "vLLM's allowed_token_ids (use logit_bias or a guided_regex)",
    "bad_words": "vLLM's bad_words (use logit_bias)",
    "logits_processors": "vLLM's logits_processors",
    "use_beam_search": "beam search",
}
"""vLLM's sampling fields this server does not implement: kept as unknown fields they
were ignored, and the reply held the very tokens they were to rule out."""
