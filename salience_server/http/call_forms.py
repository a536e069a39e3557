"""The written forms of a tool call that ``ToolCallParser`` recognises, as openings: a
call's text up to its arguments' value, whitespace removed, one per declared name.

- Hermes, Qwen2.5 and Qwen3: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
- Llama 3 JSON: a bare call object ``{"name": ..., "parameters": {...}}`` (several
  separated by ``;``), a list of them, or either inside a code fence;
- Mistral v0.3: ``[TOOL_CALLS]`` and a list of call objects (or one), each perhaps with
  an ``"id"`` after its arguments; Llama 3.2: ``<|python_tag|>`` and a call object;
- Mistral's tokenizers v11 and later (Small 3.1 and 3.2, Devstral, Magistral, Ministral
  3): ``[TOOL_CALLS]NAME[ARGS]{...}``, each call after a marker of its own, perhaps with
  an id, ``[TOOL_CALLS]NAME[CALL_ID]ID[ARGS]{...}``. After one ``[TOOL_CALLS]``, a ``[``
  or ``{`` opens v0.3's JSON and a name this form;
- DeepSeek-V3 and R1: ``<｜tool▁calls▁begin｜>``, then calls written
  ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n{...}\n```<｜tool▁call▁end｜>``,
  then ``<｜tool▁calls▁end｜>``; DeepSeek-V3.1's calls are
  ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>``. The name is no JSON
  string here, and the arguments stand alone, in no call object.

Mistral's markers (``[ARGS]`` and ``[CALL_ID]`` too) and Llama's are special tokens,
whose text a reply shows only when special tokens are kept (the shim keeps them where it
reads a reply for calls, unless the client sets ``skip_special_tokens``): without them,
the JSON after them is a bare call. DeepSeek's calls, and Mistral's from v11, parse only
where their markers reach the reply's text.

Either arguments key (``"arguments"``, ``"parameters"``) is taken in every form.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FENCES = ("```json", "```")
ARGUMENT_KEYS = ("arguments", "parameters")
MISTRAL_CALLS = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"
MISTRAL_CALL_ID = "[CALL_ID]"
PYTHON_TAG = "<|python_tag|>"
DEEPSEEK_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
DEEPSEEK_CALL_BEGIN = "<｜tool▁call▁begin｜>"
DEEPSEEK_SEP = "<｜tool▁sep｜>"
DEEPSEEK_CALL_END = "<｜tool▁call▁end｜>"
DEEPSEEK_CALLS_END = "<｜tool▁calls▁end｜>"
JSON_MARKERS = (MISTRAL_CALLS, PYTHON_TAG)
"""Markers that a JSON value of calls follows: a call object, or a list of them."""
MARKERS = (TOOL_CALL_OPEN, *JSON_MARKERS, DEEPSEEK_CALLS_BEGIN, DEEPSEEK_CALL_BEGIN)
"""Text that opens calls wherever it stands in a reply."""
BETWEEN_CALLS = (TOOL_CALL_CLOSE, DEEPSEEK_CALL_END, DEEPSEEK_CALLS_END, "```", "]", ";", ",")
"""What may stand between (or after) calls and is not text: closing tags and fences,
the end of a list of calls, separators."""


@dataclass(frozen=True)
class Opening:
    """How one call of a declared function opens."""

    text: str
    """The call's text up to its arguments' value, whitespace removed."""
    name: str
    """The function it calls."""
    in_object: bool = True
    """The arguments are a value in the call's JSON object, whose rest follows them
    (False: they stand alone, as DeepSeek's)."""
    then_id: bool = False
    """The call's id follows, then ``[ARGS]`` and the arguments (Mistral v11's
    ``[CALL_ID]``)."""


def call_openings(names: set[str], allow_bare: bool) -> list[Opening]:
    """Every opening of a call of ``names``; bare JSON ones (no tag before them) where
    ``allow_bare``."""
    openings = []
    for name in names:
        for key, spelled in itertools.product(ARGUMENT_KEYS, spellings(name)):
            call = f'{{"name":{spelled},"{key}":'
            openings.append(Opening(TOOL_CALL_OPEN + call, name))
            for marker in JSON_MARKERS:
                openings += [Opening(marker + call, name), Opening(marker + "[" + call, name)]
            if allow_bare:
                for fence in ("", *FENCES):
                    openings += [Opening(fence + call, name), Opening(fence + "[" + call, name)]
        for begin in (DEEPSEEK_CALLS_BEGIN + DEEPSEEK_CALL_BEGIN, DEEPSEEK_CALL_BEGIN):
            openings.append(Opening(f"{begin}function{DEEPSEEK_SEP}{name}```json", name, False))
            openings.append(Opening(f"{begin}{name}{DEEPSEEK_SEP}", name, False))
        openings.append(Opening(f"{MISTRAL_CALLS}{name}{MISTRAL_ARGS}", name, False))
        openings.append(Opening(f"{MISTRAL_CALLS}{name}{MISTRAL_CALL_ID}", name, False, True))
    return openings


def could_open(char: str) -> bool:
    """Whether a reply (or the text after a call) starting with ``char`` may be a call."""
    return char in "{[`<"


def spellings(name: str) -> list[str]:
    """A name as a JSON string, as a model writes it: its characters as they are (as
    chat templates' ``tojson`` shows them), or escaped past ASCII (as ``json.dumps``)."""
    return list(dict.fromkeys([json.dumps(name, ensure_ascii=False), json.dumps(name)]))
