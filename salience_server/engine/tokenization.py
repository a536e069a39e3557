"""Text and chat messages to token ids and back, with clear errors for bad input."""

from __future__ import annotations

import functools
import re
import secrets
from typing import Any

from salience_server.engine.errors import invalid
from salience_server.engine.token_bytes import pieces_bytes
from salience_server.engine.validation import check_token_ids
from salience_server.text_checks import IMAGE_PLACE, load_json, lone_surrogate_path

MAX_TOKENIZED_CHARS = 4 << 20
"""The most characters one call tokenizes (a text, or a chat as its template renders
it): the tokenizer holds about 160 bytes a character while it works (a 60 MB text took
10 GB and four minutes), and 4 Mi characters are over a million tokens, more than a
context window but the longest holds."""


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    check_length(text, "the text")
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def check_length(text: str, what: str) -> None:
    """INVALID_ARGUMENT (TEXT_TOO_LONG) for a text past ``MAX_TOKENIZED_CHARS``."""
    if len(text) > MAX_TOKENIZED_CHARS:
        raise invalid(
            "TEXT_TOO_LONG",
            f"{what} has {len(text):,} characters; at most {MAX_TOKENIZED_CHARS:,} are "
            "tokenized in one call (send it in parts)",
        )


def chat_template_text(tokenizer: Any) -> str:
    """The model's chat template as one text ("" for none). A tokenizer with named
    templates (Hermes 2 Pro's and Command R's "default" and "tool_use") holds a dict:
    the one transformers renders a call with tools through, where there is one, so
    that what reads the template (the shim, for the tool call format) reads that one."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        return str(template.get("tool_use") or template.get("default") or "")
    return str(template or "")


def encode_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    chat_template_kwargs: dict[str, Any] | None = None,
    continue_final_message: bool = False,
) -> list[int]:
    """Renders ``messages`` through the model's chat template and tokenizes the text.

    ``chat_template_kwargs`` become template variables (Qwen3's ``enable_thinking``);
    they never override the arguments named here. ``continue_final_message`` leaves
    the last (assistant) message open, so that decoding continues it."""
    if not tokenizer.chat_template:
        raise invalid("NO_CHAT_TEMPLATE", "this model has no chat template; send text instead")
    if continue_final_message and add_generation_prompt:
        raise invalid(
            "BAD_MESSAGES", "continue_final_message and add_generation_prompt exclude each other"
        )
    if continue_final_message and (not messages or messages[-1].get("role") != "assistant"):
        raise invalid("BAD_MESSAGES", "continue_final_message needs an assistant message last")
    _check_template_choice(tokenizer, chat_template_kwargs)
    escape = _SpecialTokenEscape(tokenizer)
    options = {
        **escape.hide(chat_template_kwargs or {}),  # RAG documents are text too
        "tools": escape.hide(tools),  # hidden before they are passed (they were not)
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final_message,
        "tokenize": False,
    }
    messages = escape.hide(messages)
    try:
        text = tokenizer.apply_chat_template(messages, **options)
    except Exception as error:  # the template raised on these messages
        raise invalid(
            "BAD_MESSAGES", f"the chat template rejected the messages: {error}"
        ) from error
    check_length(text, "the rendered chat")
    return escape.encode(text)


def _check_template_choice(tokenizer: Any, chat_template_kwargs: dict[str, Any] | None) -> None:
    """BAD_MESSAGES for a ``chat_template`` among the template variables other than the
    name of one of the model's own templates: transformers renders any other as the
    template itself, the client's (its text read with every special token, and a loop
    without end kept a worker thread busy long after the call's deadline)."""
    choice = (chat_template_kwargs or {}).get("chat_template")
    own = tokenizer.chat_template
    if choice is None or (isinstance(own, dict) and isinstance(choice, str) and choice in own):
        return
    names = f" (its templates: {', '.join(sorted(own))})" if isinstance(own, dict) else ""
    raise invalid(
        "BAD_MESSAGES",
        "chat_template_kwargs may not hold a chat template: the model's own renders the "
        f"messages{names}",
    )


class _SpecialTokenEscape:
    """Keeps the text of messages, tools and template variables text. Tokenizing the
    rendered template reads every special token's string as that token, so a message
    holding "<|im_end|>" would end its turn and could forge a system turn after it
    (OpenAI reads it as text). Each special string in them (but ``IMAGE_PLACE``) is
    hidden behind a marker no client can guess while the template renders; the
    template's own text is then tokenized as usual, and each hidden string as plain
    text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.specials = _special_strings(tokenizer)
        self.nonce = secrets.token_hex(8)
        self.hidden: set[str] = set()

    def hide(self, value: Any) -> Any:
        """``value`` (messages, tools) with the special strings in its text marked, its
        keys' included (a tool's parameter names, which a template writes as JSON)."""
        if isinstance(value, str):
            if any(special in value for special in self.specials):
                return self.specials_pattern.sub(self._marker, value)
            return value
        if isinstance(value, dict):
            return {self.hide(key): self.hide(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.hide(item) for item in value]
        return value

    def encode(self, text: str) -> list[int]:
        encode = self.tokenizer.encode
        if not self.hidden:
            return list(encode(text, add_special_tokens=False))
        pattern = re.compile(f"\ue000{self.nonce}:(\\d+)\ue001")
        token_ids: list[int] = []
        for index, piece in enumerate(pattern.split(text)):
            if index % 2 == 0:  # the template's text
                token_ids += encode(piece, add_special_tokens=False) if piece else []
            else:  # a hidden special string, as text
                special = self.specials[int(piece)]
                token_ids += encode(special, add_special_tokens=False, split_special_tokens=True)
        return token_ids

    @functools.cached_property
    def specials_pattern(self) -> re.Pattern[str]:
        longest_first = sorted([IMAGE_PLACE, *self.specials], key=len, reverse=True)
        return re.compile("|".join(re.escape(special) for special in longest_first))

    def _marker(self, match: re.Match[str]) -> str:
        if match.group(0) == IMAGE_PLACE:
            return IMAGE_PLACE
        self.hidden.add(match.group(0))
        return f"\ue000{self.nonce}:{self.specials.index(match.group(0))}\ue001"


@functools.lru_cache(maxsize=8)
def _special_strings(tokenizer: Any) -> list[str]:
    """The strings the tokenizer reads as special tokens."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    strings = {token.content for token in added.values() if getattr(token, "special", False)}
    strings.update(tokenizer.all_special_tokens)
    return sorted(s for s in strings if s)


def parse_json_list(text: str, what: str) -> list[dict[str, Any]]:
    value = _parse_json(text, what)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise invalid("BAD_JSON", f"{what} must be a JSON list of objects")
    return value


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    value = _parse_json(text, what)
    if not isinstance(value, dict):
        raise invalid("BAD_JSON", f"{what} must be a JSON object")
    return value


def _parse_json(text: str, what: str) -> Any:
    try:
        value = load_json(text)
    except ValueError as error:
        raise invalid("BAD_JSON", f"{what} is not valid JSON: {error}") from error
    where = lone_surrogate_path(value)
    if where is not None:
        place = f"{what} ({where})" if where else what
        raise invalid("BAD_JSON", f"{place} holds a lone UTF-16 surrogate: not valid Unicode text")
    return value


MAX_DETOKENIZED_IDS = 4 << 20
"""The most token ids one call decodes: a 64 MiB message holds 67 million one-byte ids,
gigabytes as Python ints and the tokenizer's pieces, and text past the message limit
(its answer then refused after the work)."""


def check_count(token_ids: Any) -> None:
    """INVALID_ARGUMENT (TOO_MANY_TOKENS) for more ids than ``MAX_DETOKENIZED_IDS``."""
    if len(token_ids) > MAX_DETOKENIZED_IDS:
        raise invalid(
            "TOO_MANY_TOKENS",
            f"{len(token_ids):,} token ids; at most {MAX_DETOKENIZED_IDS:,} are decoded in "
            "one call (send them in parts)",
        )


def decode(tokenizer: Any, token_ids: list[int], vocab_size: int, skip_special_tokens: bool) -> str:
    check_token_ids(token_ids, vocab_size, "token_ids")
    return str(tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))


def token_bytes(tokenizer: Any, token_ids: list[int], vocab_size: int) -> list[bytes]:
    """Each token's own bytes, which may be part of a UTF-8 character (so the token's
    text alone cannot carry them; see ``token_bytes.pieces_bytes``)."""
    check_token_ids(token_ids, vocab_size, "token_ids")
    return pieces_bytes(tokenizer, token_ids)
