"""Prompts cut to fit: ``truncation: "auto"`` of the Responses API (a conversation too
long for the context loses its oldest items until its input fits, as OpenAI drops items
from its start), and vLLM's ``truncate_prompt_tokens`` (a prompt's last k tokens); and
the room a prompt leaves its reply."""

from __future__ import annotations

from typing import Any

from salience_server.http.errors import ApiError, invalid
from salience_server.http.messages import IMAGE_PLACEHOLDER

TRUNCATE_PARAM = "truncate_prompt_tokens"


def last_tokens(
    token_ids: list[int],
    keep: int | None,
    max_context: int,
    added: tuple[list[int], list[int]] = ([], []),
) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: ``token_ids``' last ``keep`` tokens (-1: the
    model's context; None: all of them). 0 is a 400, and so is a cut inside an image's
    run of placeholder tokens (negative ids, one run per image). ``added``: the special
    tokens the tokenizer put at the text's start and end (a BOS): they stay, and count
    among the ``keep``, as vLLM's truncation in the tokenizer keeps them (a prompt
    cut to its last words without its BOS reads otherwise to a Llama 3)."""
    if keep is None:
        return token_ids
    if keep == 0:
        raise invalid(f"{TRUNCATE_PARAM} must be -1 or at least 1", TRUNCATE_PARAM)
    keep = max_context if keep == -1 else keep
    if keep >= len(token_ids):
        return token_ids
    front, back = len(added[0]), len(added[1])
    if front + back:
        end = len(token_ids) - back
        kept = max(keep - front - back, 0)
        return token_ids[:front] + token_ids[end - kept : end] + token_ids[end:]
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


def reply_limit(
    max_context: int, num_prompt_tokens: int, asked: int | None, param: str, min_tokens: int = 0
) -> int:
    """The tokens a reply may take: ``asked`` (None: as many as fit) capped at the
    context left. A prompt that leaves no room is refused (400
    ``context_length_exceeded``, naming ``param``), as OpenAI refuses it; the server
    took it, prefilled it all, and ended the reply empty. So is one that leaves less
    room than ``min_tokens`` (the server refused it naming a max_tokens never asked)."""
    if asked == 0:  # scoring, or a prefill (a prompt too long is the server's to refuse)
        return 0
    left = max_context - num_prompt_tokens
    if left <= 0:
        raise no_room_for_a_reply(max_context, num_prompt_tokens, param)
    if left < min_tokens:
        raise invalid(
            f"This model's maximum context length is {max_context} tokens; the prompt has "
            f"{num_prompt_tokens} tokens, which leaves room for {left}, fewer than "
            f"min_tokens {min_tokens}",
            param,
            "context_length_exceeded",
        )
    return left if asked is None else min(asked, left)


def no_room_for_a_reply(max_context: int, num_prompt_tokens: int, param: str) -> ApiError:
    beyond = num_prompt_tokens > max_context
    return invalid(
        f"This model's maximum context length is {max_context} tokens; the prompt has "
        f"{num_prompt_tokens} tokens, "
        + ("more than that" if beyond else "which leaves no room for a reply"),
        param,
        "context_length_exceeded",
    )
