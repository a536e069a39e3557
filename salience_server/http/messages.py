"""OpenAI messages and Responses input items, checked and normalised.

``chat_messages``/``response_input_messages`` check what the client sent and normalise
it to Chat Completions messages (text content, ``tool_calls`` with JSON-text arguments,
images pulled out as ``ImageInput``); ``template_messages`` (its own module) then adapts
those to what the model's chat template takes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any

from salience_server.http.errors import ApiError, invalid, unsupported
from salience_server.http.tool_call import new_call_id
from salience_server.text_checks import IMAGE_PLACE

_ROLES = {"system", "developer", "user", "assistant", "tool"}
_TEXT_PARTS = {"text", "input_text", "output_text"}
_IMAGE_PARTS = {"image_url", "input_image"}
_DATA_URL = re.compile(
    r"\Adata:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[^;,]*)*(?P<b64>;base64)?,(?P<data>.*)\Z",
    re.S,
)
"""RFC 2397's ``data:[<mediatype>][;base64],<data>``, the media type's parameters
(``;charset=binary``) taken and left."""


IMAGE_PLACEHOLDER = IMAGE_PLACE
"""What an image part becomes in the rendered text (the Qwen2-VL family's form): the
shim appends the start and end tokens as text and the image itself with AppendImage
where the pad token stands."""


@dataclass
class ImageInput:
    """An image from a data URL (or a remote URL, fetched only when the shim allows it);
    it becomes an AppendImage call where its part stood."""

    data: bytes
    mime_type: str
    url: str = ""
    """The remote http(s) URL when the bytes are still to be fetched."""


@dataclass
class Conversation:
    """Chat Completions messages (text content) and the images they carried, in order."""

    messages: list[dict[str, Any]]
    images: list[ImageInput] = field(default_factory=list)


def parse_image_url(url: Any, param: str) -> ImageInput:
    """A base64 data URL as bytes and MIME type (remote URLs are not fetched)."""
    if isinstance(url, dict):
        url = url.get("url")
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        return ImageInput(b"", "", url)
    match = _DATA_URL.match(url) if isinstance(url, str) else None
    if match is None or not match.group("b64"):
        raise invalid("images must be base64 data URLs (data:image/png;base64,...)", param)
    data = _base64_bytes(match.group("data"))
    if data is None:
        raise invalid("the image data URL is not valid base64", param)
    return ImageInput(data, match.group("mime") or "")  # none: the server reads the bytes


def _base64_bytes(text: str) -> bytes | None:
    """The bytes of base64 ``text`` as encoders write it: line-wrapped (the ``base64``
    command wraps at 76 columns), without its padding, or in the URL-safe alphabet; None
    for anything else (a stray character is refused, not skipped)."""
    text = "".join(text.split())
    if "-" in text or "_" in text:
        text = text.translate(_URL_SAFE)
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


_URL_SAFE = str.maketrans("-_", "+/")


def _content_text(content: Any, param: str, images: list[ImageInput]) -> str | None:
    """Text content (parts joined by newlines); image parts are collected into ``images``."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid("content must be a string or a list of parts", param)
    if not content:  # as OpenAI refuses it
        raise invalid("content is an empty array: give at least one part", param)
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid("a content part must be an object with a 'type'", f"{param}[{index}]")
        kind = part["type"]
        if kind in _TEXT_PARTS:
            if not isinstance(part.get("text"), str):
                raise invalid(f"a {kind!r} content part needs a 'text' string", f"{param}[{index}]")
            texts.append(part["text"])
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        elif kind in _IMAGE_PARTS:
            images.append(parse_image_url(part.get("image_url"), f"{param}[{index}].image_url"))
            texts.append(IMAGE_PLACEHOLDER)
        else:
            raise unsupported(f"content part {kind!r}", f"{param}[{index}]")
    return "\n".join(texts)


def _tool_calls(value: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise invalid("tool_calls must be a list", param)
    calls = []
    for index, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid("a tool call needs function.name", f"{param}[{index}]")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(
            {
                "id": call.get("id") or new_call_id(),
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return calls


def chat_messages(raw: list[dict[str, Any]]) -> Conversation:
    """Chat Completions ``messages``, checked and normalised."""
    conversation = Conversation([])
    for index, message in enumerate(raw):
        param = f"messages[{index}]"
        role = message.get("role")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise invalid("name must be a string", f"{param}.name")
        call_id = message.get("tool_call_id")
        if role == "function":  # the deprecated form of a tool result, named by its function
            role, call_id = "tool", name
            if call_id is None:
                raise _missing("a function message needs the function's name", f"{param}.name")
        if not isinstance(role, str) or role not in _ROLES:  # a list's or dict's was a 500
            raise invalid(f"unknown role {role!r}", f"{param}.role")
        content = _content_text(message.get("content"), f"{param}.content", conversation.images)
        normalised: dict[str, Any] = {"role": "system" if role == "developer" else role}
        normalised["content"] = content
        if role == "assistant":
            reasoning = _reasoning(message, param)
            if reasoning is not None:
                normalised["reasoning_content"] = reasoning
        if role == "assistant" and message.get("tool_calls"):
            normalised["tool_calls"] = _tool_calls(message["tool_calls"], f"{param}.tool_calls")
        elif content is None:
            needs = "content or tool_calls" if role == "assistant" else "content"
            raise _missing(f"a message with role {role!r} needs {needs}", f"{param}.content")
        if role == "tool":
            if not isinstance(call_id, str) or not call_id:
                raise _missing(
                    "a tool message needs the tool_call_id it answers", f"{param}.tool_call_id"
                )
            normalised["tool_call_id"] = call_id
        if name is not None:
            normalised["name"] = name
        conversation.messages.append(normalised)
    return conversation


def _reasoning(message: dict[str, Any], param: str) -> str | None:
    """An assistant message's thinking sent back (``reasoning_content``, as the shim
    returns it, or vLLM's ``reasoning``): the chat template renders it (Qwen3 keeps the
    thinking of the turn under way, between its tool calls)."""
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise invalid(f"{key} must be a string", f"{param}.{key}")
        return value
    return None


def _missing(message: str, param: str) -> ApiError:
    return invalid(message, param, "missing_required_parameter")


def _append_call(messages: list[dict[str, Any]], item: dict[str, Any], param: str) -> None:
    """A ``function_call`` item joins the assistant message just before it, or starts one."""
    if not isinstance(item.get("name"), str):
        raise invalid("a function_call item needs a name", param)
    # A call cut before its arguments has "" (as a chained response keeps it): only a
    # missing one is "{}".
    arguments = item.get("arguments")
    call = {
        "id": item.get("call_id") or new_call_id(),
        "type": "function",
        "function": {"name": item["name"], "arguments": "{}" if arguments is None else arguments},
    }
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def response_input_messages(value: str | list[dict[str, Any]]) -> Conversation:
    """Responses ``input`` (text, or message / function_call / function_call_output items)
    as Chat Completions messages."""
    if isinstance(value, str):
        return Conversation([{"role": "user", "content": value}])
    conversation = Conversation([])
    messages = conversation.messages
    reasoning: str | None = None  # a reasoning item's, for the assistant turn after it
    for index, item in enumerate(value):
        param = f"input[{index}]"
        kind = item.get("type", "message")
        is_assistant = kind == "function_call" or (kind, item.get("role")) == (
            "message",
            "assistant",
        )
        if reasoning is not None and not is_assistant and kind != "reasoning":
            messages.append(_thinking_only(reasoning))  # a reply cut while it thought
            reasoning = None
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in _ROLES - {"tool"}:
                raise invalid(f"unknown role {role!r}", f"{param}.role")
            content = _content_text(item.get("content"), f"{param}.content", conversation.images)
            if content is None:
                raise _missing("a message item needs content", f"{param}.content")
            message = {"role": "system" if role == "developer" else role, "content": content}
            if role == "assistant" and reasoning is not None:
                message["reasoning_content"] = reasoning
            messages.append(message)
        elif kind == "function_call":
            _append_call(messages, item, param)
            if reasoning is not None:
                messages[-1].setdefault("reasoning_content", reasoning)
        elif kind == "function_call_output":
            # A string, or parts (input_text, input_image) as a message's content.
            text = _content_text(item.get("output"), f"{param}.output", conversation.images)
            if text is None:
                raise _missing("a function_call_output item needs its output", f"{param}.output")
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise _missing("a function_call_output item needs its call_id", f"{param}.call_id")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind == "reasoning":
            reasoning = _reasoning_item_text(item)
            continue
        else:
            raise unsupported(f"input items of type {kind!r}", f"{param}.type")
        reasoning = None
    if reasoning is not None:
        messages.append(_thinking_only(reasoning))
    return conversation


def _thinking_only(reasoning: str) -> dict[str, Any]:
    """The assistant turn of a reasoning item nothing followed (a reply cut while it
    thought), as a response chained by ``previous_response_id`` keeps it."""
    return {"role": "assistant", "content": None, "reasoning_content": reasoning}


def _reasoning_item_text(item: dict[str, Any]) -> str | None:
    """A reasoning item's thinking: its ``reasoning_text`` content (as the shim writes
    it), else its summary's text; None when it holds neither."""
    for key, part_type in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = item.get(key)
        if isinstance(parts, list):
            texts = [
                part["text"]
                for part in parts
                if isinstance(part, dict)
                and part.get("type") == part_type
                and isinstance(part.get("text"), str)
            ]
            if texts:
                return "\n".join(texts)
    return None
