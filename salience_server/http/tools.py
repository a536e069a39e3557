"""Function tools: their definitions, ``tool_choice``, and tool calls parsed from model text.

Two forms of call are recognised in the model's output: the Hermes/Qwen form
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (any number, anywhere), and
a reply that is nothing but a JSON object (or list of objects) naming a declared tool.
``required`` and a named ``tool_choice`` are enforced by starting the assistant's turn
with the opening of a call, which the model then completes.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from salience_server.http.errors import invalid, unsupported

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_TAGGED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)
_CODE_FENCE = re.compile(r"\A```(?:json)?\s*(.*?)\s*```\Z", re.DOTALL)

TOOLS_SYSTEM_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""
"""Describes the tools to a model whose chat template does not take ``tools`` itself."""


def new_call_id() -> str:
    """A fresh ``call_...`` id."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """One call the model made."""

    name: str
    arguments: str
    """The arguments as JSON text (what OpenAI's API carries)."""
    call_id: str = field(default_factory=new_call_id)

    def chat_dict(self) -> dict[str, Any]:
        """The Chat Completions ``tool_calls`` entry."""
        return {
            "id": self.call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


ChoiceKind = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolMode:
    """The tools offered to the model and whether and how it must call one."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    """Chat Completions form: ``{"type": "function", "function": {name, ...}}``."""
    choice: ChoiceKind = "none"
    forced_name: str | None = None

    @property
    def is_enabled(self) -> bool:
        """Whether tools are offered to the model and its reply is parsed for calls."""
        return self.choice != "none" and bool(self.tools)

    @property
    def names(self) -> set[str]:
        """The declared functions' names."""
        return {tool["function"]["name"] for tool in self.tools}

    def prefix_text(self) -> str:
        """Text that opens the assistant's turn, forcing a call (empty unless forced)."""
        if self.choice == "required":
            return f"{TOOL_CALL_OPEN}\n"
        if self.choice == "named":
            return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(self.forced_name)}, "arguments": '
        return ""


def _function_tool(tool: Any, index: int, param: str) -> dict[str, Any]:
    """Checks one Chat Completions tool definition."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise unsupported("tools other than functions", f"{param}[{index}].type")
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise invalid("a function tool needs a function.name", f"{param}[{index}].function")
    return {"type": "function", "function": function}


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Chat Completions ``tools``, checked."""
    return [_function_tool(tool, i, "tools") for i, tool in enumerate(tools or [])]


def responses_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Responses ``tools`` (flat: ``{"type": "function", "name", ...}``) in chat form."""
    converted = []
    for index, tool in enumerate(tools or []):
        if tool.get("type") != "function":
            raise unsupported(f"the {tool.get('type')!r} tool", f"tools[{index}].type")
        function = {k: v for k, v in tool.items() if k in ("name", "description", "parameters")}
        converted.append(_function_tool({"type": "function", "function": function}, index, "tools"))
    return converted


def tool_mode(tools: list[dict[str, Any]], tool_choice: str | dict[str, Any] | None) -> ToolMode:
    """Resolves ``tool_choice`` (either API's form) against the declared tools."""
    if tool_choice is None:
        return ToolMode(tools, "auto" if tools else "none")
    if isinstance(tool_choice, dict):
        if tool_choice.get("type") != "function":
            raise invalid("tool_choice must name a function", "tool_choice")
        name = tool_choice.get("name") or (tool_choice.get("function") or {}).get("name")
        if name not in {tool["function"]["name"] for tool in tools}:
            raise invalid(f"tool_choice names an undeclared function {name!r}", "tool_choice")
        return ToolMode(tools, "named", name)
    kinds: dict[str, ChoiceKind] = {"none": "none", "auto": "auto", "required": "required"}
    if tool_choice not in kinds:
        raise invalid(f"tool_choice {tool_choice!r} is not none, auto or required", "tool_choice")
    if tool_choice == "required" and not tools:
        raise invalid("tool_choice 'required' needs tools", "tool_choice")
    return ToolMode(tools, kinds[tool_choice])


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The Hermes tool description for templates that do not render ``tools`` themselves."""
    return TOOLS_SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))


def _call_from_value(value: Any, names: set[str]) -> ToolCall | None:
    """A ToolCall from a decoded JSON object naming a declared tool, else None."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(value["name"], arguments)


def _call_from_json(text: str, names: set[str]) -> ToolCall | None:
    try:
        return _call_from_value(json.loads(text), names)
    except json.JSONDecodeError:
        return None


def _bare_calls(text: str, names: set[str]) -> list[ToolCall]:
    """Calls from a reply that is only a JSON object or list of objects (maybe fenced)."""
    stripped = text.strip()
    fenced = _CODE_FENCE.match(stripped)
    try:
        value = json.loads(fenced.group(1) if fenced else stripped)
    except json.JSONDecodeError:
        return []
    values = value if isinstance(value, list) else [value]
    calls = [_call_from_value(v, names) for v in values]
    return [c for c in calls if c is not None] if values and all(calls) else []


def parse_tool_calls(text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    """(the text outside any call, the calls) of a model's reply; no calls: (text, [])."""
    if TOOL_CALL_OPEN in text:
        calls: list[ToolCall] = []
        outside, start = [], 0
        for match in _TAGGED_CALL.finditer(text):
            call = _call_from_json(match.group(1), names)
            if call is not None:
                calls.append(call)
                outside.append(text[start : match.start()])
                start = match.end()
        outside.append(text[start:])
        return ("".join(outside).strip(), calls) if calls else (text, [])
    calls = _bare_calls(text, names)
    return ("", calls) if calls else (text, [])


class ToolCallFilter:
    """Streams a reply's text while holding back whatever may be a tool call.

    Text is released as it comes until ``<tool_call>`` may be starting; a reply that
    opens with ``{``, ``[`` or a code fence is held whole (it may be a bare JSON call).
    ``finish`` parses everything and returns the content not yet released.
    """

    def __init__(self, names: set[str], prefix: str = "") -> None:
        self._names = names
        self._text = prefix
        """The whole reply so far, the forced prefix included."""
        self._held = prefix
        self._is_holding_all = bool(prefix)
        self._has_started = False

    def push(self, delta: str) -> str:
        """Adds model text; returns the content safe to stream now."""
        self._text += delta
        self._held += delta
        if self._is_holding_all:
            return ""
        if not self._has_started:
            stripped = self._held.lstrip()
            if not stripped:
                return ""
            self._has_started = True
            if stripped[0] in "{[`":
                self._is_holding_all = True
                return ""
        cut = self._held.find(TOOL_CALL_OPEN)
        if cut >= 0:
            self._is_holding_all = True
        else:
            cut = len(self._held) - _partial_suffix(self._held, TOOL_CALL_OPEN)
        released, self._held = self._held[:cut], self._held[cut:]
        return released

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not yet released, the tool calls in the whole reply)."""
        _, calls = parse_tool_calls(self._text, self._names)
        if not calls:
            return self._held, []
        rest, _ = parse_tool_calls(self._held, self._names)
        return rest, calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0
