"""Prompts cut to fit: ``truncation: "auto"`` of the Responses API (a conversation too
long for the context loses its oldest items until its input fits, as OpenAI drops items
from its start), and vLLM's ``truncate_prompt_tokens`` (a prompt's last k tokens)."""

from __future__ import annotations

from typing import Any

from salience_server.http.errors import invalid
from salience_server.http.messages import IMAGE_PLACEHOLDER

TRUNCATE_PARAM = "truncate_prompt_tokens"


def last_tokens(token_ids: list[int], keep: int | None, max_context: int) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: ``token_ids``' last ``keep`` tokens (-1: the
    model's context; None: all of them). 0 is a 400, and so is a cut inside an image's
    run of placeholder tokens (negative ids, one run per image)."""
    if keep is None:
        return token_ids
    if keep == 0:
        raise invalid(f"{TRUNCATE_PARAM} must be -1 or at least 1", TRUNCATE_PARAM)
    keep = max_context if keep == -1 else keep
    if keep >= len(token_ids):
        return token_ids
    cut = len(token_ids) - keep
    if token_ids[cut] < 0 and token_ids[cut - 1] == token_ids[cut]:
        raise invalid(f"{TRUNCATE_PARAM} {keep} would cut an image in two", TRUNCATE_PARAM)
    return token_ids[cut:]


def without_oldest(conversation: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int] | None:
    """``conversation`` without its oldest message, and without the tool results that
    follow it (their calls went with it: a tool result may not open a conversation); and
    how many images went with them. None where only the last message would be left to
    drop: the new input is never dropped."""
    end = 1
    while end < len(conversation) and conversation[end].get("role") == "tool":
        end += 1
    if end >= len(conversation):
        return None
    num_images = sum(
        str(message.get("content") or "").count(IMAGE_PLACEHOLDER) for message in conversation[:end]
    )
    return conversation[end:], num_images
