"""Function tools: their definitions, ``tool_choice``, and the tool-call format of the
model's family.

Calls are parsed out of the model's text by ``tool_parser``. The format a family's chat
template teaches (``tool_format``) decides how a call is forced: ``required`` starts the
assistant's turn with the format's opening and constrains the rest to calls of the
declared tools; a named function also writes the call's head (its name), and constrains
the arguments to its parameters' schema.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from salience_server.http.call_grammar import CallGrammar, json_rule
from salience_server.http.constraints import Constraint, Sourced, json_schema_text
from salience_server.http.errors import invalid, unsupported
from salience_server.http.tool_call import ToolCall
from salience_server.http.tool_format import HERMES, ToolFormat
from salience_server.http.tool_parser import ToolCallParser
from salience_server.http.tool_schema import argument_problem, constraint_broken, rooted_at

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


MAX_FORCED_CALLS = 16
"""Calls a reply forced to call (``required``, parallel calls allowed) may hold: a small
model that repeats its call stops there."""

_EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
"""A function declared without parameters takes none (OpenAI's rule)."""


_HOSTED_TOOLS = ("file_search", "web_search", "web_search_preview", "computer_use_preview")
"""OpenAI's own tools, which a tool_choice of theirs names."""

ChoiceKind = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolMode:
    """The tools offered to the model and whether and how it must call one."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    """Chat Completions form: ``{"type": "function", "function": {name, ...}}``."""
    choice: ChoiceKind = "none"
    forced_name: str | None = None
    format: ToolFormat = HERMES
    is_parallel: bool = True
    """``parallel_tool_calls``: more than one call per reply."""
    marker_ids: Mapping[str, int] = field(default_factory=dict)
    """The token id of each of the format's markers that is one token of the model's
    (``grammar_markers``, asked of the server): ``required``'s grammar writes it so."""

    @property
    def is_enabled(self) -> bool:
        """Whether tools are offered to the model and its reply is parsed for calls."""
        return self.choice != "none" and bool(self.tools)

    @property
    def is_forced(self) -> bool:
        """Whether the reply must be a call (``required`` or a named function)."""
        return self.choice in ("required", "named")

    @property
    def names(self) -> set[str]:
        """The declared functions' names."""
        return {tool["function"]["name"] for tool in self.tools}

    def parameters(self, name: str) -> dict[str, Any]:
        """The JSON schema of a declared function's arguments."""
        tool = next(t for t in self.tools if t["function"]["name"] == name)
        return tool["function"].get("parameters") or _EMPTY_PARAMETERS

    @property
    def grammar_markers(self) -> tuple[str, ...]:
        """The format's markers that a forced reply's grammar writes (``required``'s)."""
        return self.format.markers if self.choice == "required" and self.tools else ()

    def prefix_text(self) -> str:
        """Text that opens the assistant's turn, forcing a call (empty unless forced)."""
        if self.choice == "required":
            return self.format.opening
        if self.choice == "named" and self.forced_name is not None:
            return self.format.opening + self.format.head(self.forced_name)
        return ""

    def constraint(self) -> Constraint | None:
        """What a forced call's text after ``prefix_text`` must be: the named function's
        arguments; for ``required``, one call of any declared function (a call object,
        or the name and arguments of DeepSeek's and Mistral v11's), or, where parallel
        calls are allowed and the grammar can write what stands between calls, up to
        ``MAX_FORCED_CALLS`` of them, separated and closed in the family's markup (a
        Lark grammar whose calls are JSON Schema rules, and whose markers that are one
        token are that token, ``CallGrammar``)."""
        if self.choice == "named" and self.forced_name is not None:
            return "json_schema", json.dumps(self.parameters(self.forced_name))
        if self.choice != "required":
            return None
        grammar = CallGrammar(self.format, self.marker_ids)
        max_calls = MAX_FORCED_CALLS if self.is_parallel else 1
        if not self.format.is_json_call:
            parameters = {name: self.parameters(name) for name in self.names}
            return "lark", grammar.named_calls(parameters, max_calls)
        schema = self._call_schema()
        if max_calls == 1 or not grammar.can_chain:
            return "json_schema", json.dumps(schema)
        return "lark", grammar.chained(max_calls) + f"call: {json_rule(schema)}\n"

    def _call_schema(self) -> dict[str, Any]:
        """One call object of any declared function. Each function's parameters go under
        the root's ``$defs`` (``tool_<i>``), their own references rewritten to point there:
        a reference of theirs (``#/$defs/Point``, as pydantic writes nested models) means
        their own root, which is no longer the schema's."""
        key = self.format.arguments_key
        calls, definitions = [], {}
        for index, name in enumerate(sorted(self.names)):
            where = f"#/$defs/tool_{index}"
            definitions[f"tool_{index}"] = rooted_at(self.parameters(name), where)
            calls.append(
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [name]},
                        key: {"$ref": where},
                    },
                    "required": ["name", key],
                    "additionalProperties": False,
                }
            )
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return {**schema, "$defs": definitions}

    def reply_constraint(self, output: Sourced | None) -> Sourced | None:
        """What constrains the reply, and the field its errors name: a forced call's
        schema ("tools"), else the structured ``output`` asked for."""
        forced = self.constraint()
        return ("tools", forced) if forced is not None else output

    def stop_strings(self) -> tuple[str, ...]:
        """Ends the reply after its first call when only one is allowed (where the
        format has a text that ends one, and no call may hold: ``</tool_call>``)."""
        if self.is_enabled and not self.is_parallel and self.format.stop:
            return (self.format.stop,)
        return ()

    def check_forced(
        self, calls: list[ToolCall], done_reason: str, is_client_stop: bool = False
    ) -> None:
        """A forced call was constrained to its schema: a reply that ended (an EOS, the
        call's own close) without one valid call means the server did not keep to the
        constraint, a server error (500) rather than a broken call handed on. A reply cut
        short (max_tokens, the context, or, ``is_client_stop``, a stop of the client's
        own: a stop string or ``stop_token_ids`` token, which the grammar may allow
        inside the call, ``client_stopped``) is no fault. ``done_reason``: the server's."""
        if not self.is_forced or done_reason not in ("stop", "stop_string") or is_client_stop:
            return
        if not calls:
            raise constraint_broken("the reply holds no tool call")
        for call in calls:
            problem = argument_problem(call.arguments, self.parameters(call.name))
            if problem is not None:
                raise constraint_broken(f"the arguments of {call.name!r} {problem}")

    def parser(self, allow_bare: bool = True) -> ToolCallParser:
        """A parser of one reply, which starts with the forced opening."""
        max_calls = None if self.is_parallel else 1
        return ToolCallParser(self.names, max_calls, allow_bare, self.prefix_text())


def _function_tool(tool: Any, param: str) -> dict[str, Any]:
    """Checks one Chat Completions tool definition (``param``: where its function is).
    Its parameters must be a JSON schema, as for ``response_format``, whether or not a
    call is forced (a bad one failed only once a forced call compiled it)."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise unsupported("tools other than functions", f"{param.removesuffix('.function')}.type")
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise invalid("a function tool needs a name", f"{param}.name")
    if function.get("parameters") is not None:
        if not isinstance(function["parameters"], dict):
            raise invalid(
                "a function's parameters must be a JSON schema object", f"{param}.parameters"
            )
        json_schema_text(function["parameters"], f"{param}.parameters")
    return {"type": "function", "function": function}


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Chat Completions ``tools``, checked."""
    return [_function_tool(tool, f"tools[{i}].function") for i, tool in enumerate(tools or [])]


def responses_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Responses ``tools`` (flat: ``{"type": "function", "name", ...}``) in chat form."""
    converted = []
    for index, tool in enumerate(tools or []):
        if tool.get("type") != "function":
            raise unsupported(f"the {tool.get('type')!r} tool", f"tools[{index}].type")
        function = {k: v for k, v in tool.items() if k in ("name", "description", "parameters")}
        converted.append(
            _function_tool({"type": "function", "function": function}, f"tools[{index}]")
        )
    return converted


def tool_mode(
    tools: list[dict[str, Any]],
    tool_choice: str | dict[str, Any] | None,
    format: ToolFormat = HERMES,
    parallel_tool_calls: bool | None = None,
) -> ToolMode:
    """Resolves ``tool_choice`` (either API's form) against the declared tools."""
    is_parallel = parallel_tool_calls is not False
    if not tools and tool_choice not in (None, "none"):  # as OpenAI and vLLM refuse it
        raise invalid("tool_choice is only allowed when tools are given", "tool_choice")
    if tool_choice is None:
        return ToolMode(tools, "auto" if tools else "none", None, format, is_parallel)
    if isinstance(tool_choice, dict):
        kind = tool_choice.get("type")
        if kind in ("allowed_tools", "custom", "mcp") or kind in _HOSTED_TOOLS:
            raise unsupported(f"tool_choice of type {kind!r}", "tool_choice.type")
        if kind != "function":
            raise invalid("tool_choice must name a function", "tool_choice")
        name = tool_choice.get("name") or (tool_choice.get("function") or {}).get("name")
        if name not in {tool["function"]["name"] for tool in tools}:
            raise invalid(f"tool_choice names an undeclared function {name!r}", "tool_choice")
        return ToolMode(tools, "named", name, format, is_parallel)
    kinds: dict[str, ChoiceKind] = {"none": "none", "auto": "auto", "required": "required"}
    if tool_choice not in kinds:
        raise invalid(f"tool_choice {tool_choice!r} is not none, auto or required", "tool_choice")
    return ToolMode(tools, kinds[tool_choice], None, format, is_parallel)


def tool_calls_reason(reason: str, calls: list[ToolCall]) -> str:
    """Chat's finish_reason for a reply holding ``calls``: ``tool_calls`` when it stopped
    after them; a reply that ended inside a call (an EOS in its arguments, a client's stop
    string) keeps ``stop``, so that no one parses the unfinished arguments as a call."""
    if reason == "stop" and calls and all(call.is_complete for call in calls):
        return "tool_calls"
    return reason


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The Hermes tool description for templates that do not render ``tools`` themselves."""
    # Characters as they are, as chat templates' ``tojson`` writes them: a description
    # in Japanese stays readable to the model.
    tools_json = (json.dumps(tool, ensure_ascii=False) for tool in tools)
    return TOOLS_SYSTEM_PROMPT.format(tools="\n".join(tools_json))
