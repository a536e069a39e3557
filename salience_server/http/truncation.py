"""``truncation: "auto"`` of the Responses API: a conversation too long for the context
loses its oldest items until its input fits (OpenAI drops items from its start)."""

from __future__ import annotations

from typing import Any

from salience_server.http.messages import IMAGE_PLACEHOLDER


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
