"""Chat Completions messages adapted to what a Hugging Face chat template takes:
arguments as objects, ``content`` never None; for templates without tool support, tool
calls and results written as Hermes text, fitted to the roles the template renders
(``TemplateRoles``); tool call ids cut for templates that take 9 characters only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from salience_server.http.call_forms import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from salience_server.http.tools import tools_system_prompt
from salience_server.text_checks import load_json


def template_supports_tools(chat_template: str) -> bool:
    """Whether the model's chat template renders ``tools`` itself."""
    return "tools" in chat_template


_NINE_CHARACTER_IDS = re.compile(r"id\s*\|\s*length\s*!=\s*9")
"""Mistral's templates refuse a tool call id that is not 9 letters or digits."""


def template_wants_short_call_ids(chat_template: str) -> bool:
    """Whether the chat template takes tool call ids of 9 letters or digits only
    (Mistral v0.3's raises on the shim's own, ``call_`` and 24 hex digits)."""
    return bool(_NINE_CHARACTER_IDS.search(chat_template))


def short_call_id(call_id: str) -> str:
    """A tool call id as Mistral's templates take it: its last 9 letters or digits (as
    vLLM cuts them), zeros before where it has fewer; the same id gives the same."""
    return re.sub(r"[^A-Za-z0-9]", "", call_id)[-9:].rjust(9, "0")


class ShortCallIds:
    """One conversation's tool call ids cut to 9 letters or digits (``short_call_id``),
    each kept distinct: an id whose cut another id took already is given 9 hex digits of
    its hash instead (two calls and their results would otherwise share one id). Ids are
    cut in the conversation's order, so a longer conversation cuts its beginning the
    same (its rendering extends the previous one's)."""

    def __init__(self) -> None:
        self._cut: dict[str, str] = {}

    def __call__(self, call_id: str) -> str:
        if call_id not in self._cut:
            taken = set(self._cut.values())
            cut, attempt = short_call_id(call_id), 0
            while cut in taken:
                attempt += 1
                cut = hashlib.sha256(f"{attempt}:{call_id}".encode()).hexdigest()[:9]
            self._cut[call_id] = cut
        return self._cut[call_id]


def _hermes_calls(calls: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{TOOL_CALL_OPEN}\n"
        + json.dumps(
            {"name": c["function"]["name"], "arguments": _arguments(c)}, ensure_ascii=False
        )
        + f"\n{TOOL_CALL_CLOSE}"
        for c in calls
    )


def _arguments(call: dict[str, Any]) -> Any:
    """A call's arguments as an object when they are JSON (templates expect objects)."""
    text = call["function"]["arguments"]
    try:
        return load_json(text)
    except (ValueError, TypeError):
        return text


@dataclass(frozen=True)
class TemplateRoles:
    """Which roles a chat template without tool support renders, so that the shim's
    Hermes fallback fits it. Gemma's and Mistral v0.1's templates raise on a system
    message and Phi-3-medium's drops it (the tools' description goes into the first user
    message instead); they raise on a ``tool`` one, and Phi-3's silently drops a ``tool``
    message (tool results are then user
    messages, consecutive ones merged, as Qwen2.5's template writes them, and a user
    message after them merged too, as roles must alternate in Gemma's)."""

    system: bool = True
    tool: bool = True


SYSTEM_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
"""Rendered with and without its first message to learn whether a template renders a
system message (one may raise on it, or drop it)."""
TOOL_PROBE = [
    {"role": "user", "content": "u"},
    {"role": "assistant", "content": "a"},
    {"role": "tool", "content": "t", "tool_call_id": "c"},
]
"""Rendered with and without its last message to learn whether a template renders a
``tool`` message."""


def needs_roles(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], has_tool_template: bool
) -> bool:
    """Whether rendering ``messages`` depends on ``TemplateRoles`` (the fallback's)."""
    return not has_tool_template and (bool(tools) or any(m["role"] == "tool" for m in messages))


def template_messages(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    has_tool_template: bool,
    roles: TemplateRoles | None = None,
    short_call_ids: bool = False,
) -> list[dict[str, Any]]:
    """Chat Completions messages as the chat template takes them. Without tool support in
    the template, the tools are described in the system message (the first user message
    where ``roles`` says it takes none, the system message's text then opening it too),
    and calls and results are written as Hermes text (results as user messages where it
    renders no ``tool`` one, merged with the results or user message after them). With
    ``short_call_ids``, call ids are cut to 9 characters (``ShortCallIds``)."""
    roles = roles or TemplateRoles()
    short = ShortCallIds()
    as_user = not has_tool_template and not roles.tool
    rendered: list[dict[str, Any]] = []
    follows_result = False  # the last rendered message is tool results as a user's
    for message in messages:
        out = dict(message, content=message.get("content") or "")
        if "reasoning_content" in message:  # templates read either name (as vLLM gives them)
            out["reasoning"] = message["reasoning_content"]
        calls = message.get("tool_calls")
        if short_call_ids and "tool_call_id" in out:
            out["tool_call_id"] = short(out["tool_call_id"])
        if calls and has_tool_template:
            out["tool_calls"] = [
                {
                    **c,
                    "id": short(c["id"]) if short_call_ids else c["id"],
                    "function": {**c["function"], "arguments": _arguments(c)},
                }
                for c in calls
            ]
        elif calls:
            del out["tool_calls"]
            out["content"] = "\n".join(filter(None, [out["content"], _hermes_calls(calls)]))
        elif message["role"] == "tool" and not has_tool_template:
            out["content"] = f"<tool_response>\n{out['content']}\n</tool_response>"
            if as_user:
                out = {"role": "user", "content": out["content"]}
        if follows_result and out["role"] == "user":
            # Results and a user message after them are one user message: the templates
            # that take no tool role may require roles to alternate (Gemma's raised).
            merged = f"{rendered[-1]['content']}\n{out['content']}"
            rendered[-1] = dict(rendered[-1], content=merged)
            continue
        follows_result = as_user and message["role"] == "tool"
        rendered.append(out)
    if tools and not has_tool_template:
        description = tools_system_prompt(tools)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = dict(rendered[0], content=f"{rendered[0]['content']}\n\n{description}")
        elif not roles.system and rendered and rendered[0]["role"] == "user":
            rendered[0] = dict(rendered[0], content=f"{description}\n\n{rendered[0]['content']}")
        else:
            rendered.insert(0, {"role": "system", "content": description})
    opens = rendered[:2] if not roles.system else []
    if [m["role"] for m in opens] == ["system", "user"]:
        # The system message (with the tools' description) opens the first user message.
        system = rendered.pop(0)
        rendered[0] = dict(rendered[0], content=f"{system['content']}\n\n{rendered[0]['content']}")
    return rendered
