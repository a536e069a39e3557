"""``ToolFormat``: how a model family writes a tool call, read from its chat template.

The format decides how a call is forced: the text that opens the assistant's turn (the
format's ``opening``, then, for a named function, the call's ``head``), what stands
between calls and after the last, and where a reply allowed one call only stops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from salience_server.http.call_forms import (
    DEEPSEEK_CALL_BEGIN,
    DEEPSEEK_CALL_END,
    DEEPSEEK_CALLS_BEGIN,
    DEEPSEEK_CALLS_END,
    DEEPSEEK_SEP,
    MISTRAL_ARGS,
    MISTRAL_CALLS,
    PYTHON_TAG,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
)

_MARKERS = (
    TOOL_CALL_OPEN,
    TOOL_CALL_CLOSE,
    MISTRAL_CALLS,
    MISTRAL_ARGS,
    DEEPSEEK_CALLS_BEGIN,
    DEEPSEEK_CALL_BEGIN,
    DEEPSEEK_SEP,
    DEEPSEEK_CALL_END,
    DEEPSEEK_CALLS_END,
)
"""Every family's markers, which may be tokens of their own."""


@dataclass(frozen=True)
class ToolFormat:
    """How a model family writes its tool calls."""

    name: str
    opening: str
    """Text before the first call."""
    separator: str
    """Text between two calls; empty where the format writes one call only."""
    closing: str
    """Text after the last call."""
    arguments_key: str
    """The key of a call object's arguments, beside ``"name"``."""
    stop: str = ""
    """Ends a reply after its first call, where only one is allowed (empty: no text
    does; a call's own text may hold any other)."""
    is_json_call: bool = True
    """A call is a JSON object of ``"name"`` and ``arguments_key``; False: its name is
    written before its arguments, outside any JSON (DeepSeek's, Mistral v11's)."""
    name_end: str = ""
    """Where the name is outside JSON: what stands between it and the arguments."""
    has_token_markers: bool = False
    """Its markers are special tokens in the family's tokenizers, which no text of a
    grammar stands for: a forced reply holds several calls only where each marker
    between and after them is one token, which the grammar then names by its id
    (DeepSeek's, Mistral v11's)."""

    @property
    def markers(self) -> tuple[str, ...]:
        """The markers a forced reply's grammar writes (between calls, after the last,
        after a name): each is written as its token where it is one token."""
        written = self.separator + self.closing + self.name_end
        return tuple(marker for marker in _MARKERS if marker in written)

    def head(self, name: str) -> str:
        """A call of ``name`` up to its arguments' value, as the family writes it."""
        if not self.is_json_call:
            return name + self.name_end
        spelled = json.dumps(name, ensure_ascii=False)
        return f'{{"name": {spelled}, "{self.arguments_key}": '


HERMES = ToolFormat(
    "hermes",
    f"{TOOL_CALL_OPEN}\n",
    f"\n{TOOL_CALL_CLOSE}\n{TOOL_CALL_OPEN}\n",
    f"\n{TOOL_CALL_CLOSE}",
    "arguments",
    TOOL_CALL_CLOSE,
)
"""Hermes, Qwen2.5 and Qwen3; also what the shim describes to a template without tool
support."""
LLAMA3_JSON = ToolFormat("llama3_json", "", "", "", "parameters")
"""Llama 3.1's: a bare call object (its template takes one call per message)."""
MISTRAL = ToolFormat("mistral", f"{MISTRAL_CALLS} [", ", ", "]", "arguments")
"""Mistral v0.3's: ``[TOOL_CALLS]`` and a JSON list of call objects."""
DEEPSEEK = ToolFormat(
    "deepseek",
    f"{DEEPSEEK_CALLS_BEGIN}{DEEPSEEK_CALL_BEGIN}function{DEEPSEEK_SEP}",
    f"\n```{DEEPSEEK_CALL_END}\n{DEEPSEEK_CALL_BEGIN}function{DEEPSEEK_SEP}",
    f"\n```{DEEPSEEK_CALL_END}{DEEPSEEK_CALLS_END}",
    "",
    is_json_call=False,
    name_end="\n```json\n",
    has_token_markers=True,
)
"""DeepSeek-V3's and R1's: each call's name, then its arguments in a JSON code fence,
between markers, two calls separated as the template writes them (the fence and
``<｜tool▁call▁end｜>`` closing one, a newline and ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>``
opening the next). The markers are special tokens: a forced reply holds several calls
where each is one token of the model's tokenizer, the grammar naming it by its id, and
one call otherwise (no text of a grammar stands for a special token)."""
MISTRAL_V11 = ToolFormat(
    "mistral_v11",
    MISTRAL_CALLS,
    MISTRAL_CALLS,
    "",
    "",
    is_json_call=False,
    name_end=MISTRAL_ARGS,
    has_token_markers=True,
)
"""Mistral's from its tokenizer v11 (Small 3.1 and 3.2, Devstral, Magistral, Ministral
3): ``[TOOL_CALLS]``, the name, ``[ARGS]`` and the arguments' JSON, each call after its
own ``[TOOL_CALLS]``. A forced named call's ``[ARGS]`` is in the prompt, the special
token the template writes. Under ``required``, the grammar names ``[ARGS]`` after the
name and the ``[TOOL_CALLS]`` before each further call by their token ids, as the model
writes them, where each is one token; where ``[TOOL_CALLS]`` is not, the reply holds
one call, as DeepSeek's (and an ``[ARGS]`` that is not one token is spelled in
characters, which parse the same). No text stops a reply after its first call:
``[TOOL_CALLS]`` opens the first too."""


def tool_format(chat_template: str) -> ToolFormat:
    """The family's format, read from its chat template: Hermes where it writes
    ``<tool_call>``; Mistral v11's where it writes ``[TOOL_CALLS]`` and ``[ARGS]``,
    v0.3's where ``[TOOL_CALLS]`` alone (and a list); DeepSeek's where it renders tools and
    writes calls as DeepSeek-V3 and R1 do; Llama 3's where it mentions the
    ``"parameters"`` of a call (or its ``<|python_tag|>``); Hermes otherwise."""
    if TOOL_CALL_OPEN in chat_template:
        return HERMES
    if MISTRAL_CALLS in chat_template:
        return MISTRAL_V11 if MISTRAL_ARGS in chat_template else MISTRAL
    if _writes_deepseek_calls(chat_template):
        return DEEPSEEK
    if '"parameters"' in chat_template or PYTHON_TAG in chat_template:
        return LLAMA3_JSON
    return HERMES


def _writes_deepseek_calls(chat_template: str) -> bool:
    """Whether the template renders tools and writes calls as DeepSeek-V3 and R1 do (a
    name, then its arguments in a JSON code fence). R1's own template renders no tools:
    the shim describes them in Hermes' format, which the model is then to write."""
    return "tools" in chat_template and DEEPSEEK_SEP in chat_template and "```json" in chat_template
