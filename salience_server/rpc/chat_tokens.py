"""A Tokenize call's chat messages: rendered through the chat template, each image place
made as many pad tokens as AppendImage would make of its image."""

from __future__ import annotations

import asyncio

from salience_client.pb import salience_pb2 as pb
from salience_server.engine import tokenization
from salience_server.engine.engine import Engine
from salience_server.engine.errors import invalid


async def tokenize_chat(engine: Engine, request: pb.TokenizeRequest) -> list[int]:
    """``request.messages`` as token ids (SalienceError for what cannot be rendered)."""
    chat = request.messages
    messages = (
        tokenization.parse_json_list(chat.messages_json, "messages_json")
        if chat.messages_json
        else [{"role": m.role, "content": m.content} for m in chat.messages]
    )
    tools = (
        tokenization.parse_json_list(request.tools_json, "tools_json")
        if request.tools_json
        else None
    )
    template_kwargs = (
        tokenization.parse_json_object(
            request.chat_template_kwargs_json, "chat_template_kwargs_json"
        )
        if request.chat_template_kwargs_json
        else None
    )
    token_ids = await asyncio.to_thread(
        tokenization.encode_chat,
        engine.loaded.tokenizer,
        messages,
        tools,
        request.add_generation_prompt,
        template_kwargs,
        request.continue_final_message,
    )
    if not request.images:
        return token_ids
    counts = [
        await asyncio.to_thread(engine.image_placeholder_count, image.data, image.mime_type)
        for image in request.images
    ]
    return expand_image_places(token_ids, engine.loaded.special_token_id("image_token_id"), counts)


def expand_image_places(token_ids: list[int], pad_id: int | None, counts: list[int]) -> list[int]:
    """``token_ids`` with its ``i``-th pad token repeated ``counts[i]`` times; the pad
    tokens must be one per image."""
    places = [i for i, token_id in enumerate(token_ids) if token_id == pad_id]
    if len(places) != len(counts):
        raise invalid(
            "BAD_MESSAGES",
            f"the messages hold {len(places)} image places for {len(counts)} images",
        )
    expanded = list(token_ids)
    for place, count in reversed(list(zip(places, counts, strict=True))):
        expanded[place : place + 1] = [token_ids[place]] * count
    return expanded
