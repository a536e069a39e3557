"""Text and chat messages to token ids and back, with clear errors for bad input."""

from __future__ import annotations

import json
from typing import Any

from salience_server.engine.errors import invalid
from salience_server.engine.validation import check_token_ids


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def encode_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
) -> list[int]:
    """Renders ``messages`` through the model's chat template and tokenizes the text."""
    if not tokenizer.chat_template:
        raise invalid("NO_CHAT_TEMPLATE", "this model has no chat template; send text instead")
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except Exception as error:  # the template raised on these messages
        raise invalid(
            "BAD_MESSAGES", f"the chat template rejected the messages: {error}"
        ) from error
    return list(tokenizer.encode(text, add_special_tokens=False))


def parse_json_list(text: str, what: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise invalid("BAD_JSON", f"{what} is not valid JSON: {error}") from error
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise invalid("BAD_JSON", f"{what} must be a JSON list of objects")
    return value


def decode(tokenizer: Any, token_ids: list[int], vocab_size: int, skip_special_tokens: bool) -> str:
    check_token_ids(token_ids, vocab_size, "token_ids")
    return str(tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))
