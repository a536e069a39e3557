"""``Backend``: what every route shares: the gRPC client, the session pool, the token-text
cache, the response store, and the served model's description."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc

from salience_client import AsyncSalienceClient, Failover, ModelInfo, SalienceClientError
from salience_server import text_checks
from salience_server.http import image_fetch
from salience_server.http.config import ShimConfig
from salience_server.http.errors import ApiError, client_errors, invalid, model_not_found
from salience_server.http.image_markers import RecentCounts, image_marker
from salience_server.http.logprobs import TokenTexts
from salience_server.http.messages import ImageInput
from salience_server.http.pooled_session import common_prefix_length
from salience_server.http.reasoning import (
    THINK_CLOSE,
    THINK_OPEN,
    Reasoning,
    closes_thinking,
    opens_thinking,
    template_reasons,
)
from salience_server.http.response_store import ResponseStore
from salience_server.http.server_health import Health, check_health
from salience_server.http.sessions_pool import SessionPool
from salience_server.http.template_messages import (
    SYSTEM_PROBE,
    TOOL_PROBE,
    TemplateRoles,
    needs_roles,
    template_messages,
    template_supports_tools,
    template_wants_short_call_ids,
)

CLOSE_TIMEOUT_S = 5.0
"""Bound on each call closing the pool's sessions at the end of a stop's grace."""
THINKING_TAIL_TOKENS = 32
"""Prompt tokens decoded to see whether the prompt leaves a ``<think>`` open."""
_PROBE = "Hello world"
"""A text tokenized with and without special tokens, to see which the tokenizer adds."""

_T = TypeVar("_T")


@dataclass(frozen=True)
class RenderOptions:
    """How the chat template renders a conversation (vLLM's request fields)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    """Leave the last (assistant) message open, to be continued."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra template variables (Qwen3's ``enable_thinking``)."""


class Backend:
    """The shim's view of one Salience server."""

    def __init__(self, config: ShimConfig) -> None:
        self.config = config
        self.client = AsyncSalienceClient(
            config.target,
            timeout=config.rpc_timeout_s,
            api_key=config.api_key,
            replay=Failover(replay=config.replay, retry_budget_s=config.retry_budget_s),
        )
        self.pool = SessionPool(self.client, config.max_pooled_sessions)
        self.token_texts = TokenTexts(self.client)
        self.responses = ResponseStore(
            config.max_stored_responses, config.max_stored_image_bytes, config.max_stored_tokens
        )
        self.created = int(time.time())
        self._model_info: ModelInfo | None = None
        self._facts: dict[str, Any] = {}
        """What was learned of the served model by asking the server (``_learned``):
        forgotten when its model info is asked again."""
        self.image_token_counts: dict[int, int] = RecentCounts()
        """Placeholder tokens each image (by marker) took when it was appended."""
        # A channel of its own, so that /health works whatever the client is doing.
        self.health_channel = grpc.aio.insecure_channel(config.target)

    async def end_calls(self) -> None:
        """At the end of a stop's grace: the calls still open fail CLIENT_CLOSED (their
        requests end as a 503), and the pool's sessions are closed on the server through
        a client of their own (this one, closed, no longer can: they held the server's
        KV and image memory till their TTL)."""
        routes = self.pool.routes()
        await self.client.close()
        config = self.config
        closer = AsyncSalienceClient(
            config.target, timeout=CLOSE_TIMEOUT_S, api_key=config.api_key, replay=False
        )
        async with closer:
            for session_id, routing_key in routes:
                with contextlib.suppress(SalienceClientError):
                    await (await closer.session(session_id, routing_key)).close()

    async def close(self) -> None:
        """Closes the pooled sessions and the channels."""
        await self.pool.close()
        await self.client.close()
        await self.health_channel.close()

    async def model_info(self) -> ModelInfo:
        """The served model (asked once, then cached)."""
        if self._model_info is None:
            with client_errors():
                self._model_info = await self.client.model_info()
            self._facts = {}
        return self._model_info

    async def _learned(self, key: str, learn: Callable[[], Awaitable[_T]]) -> _T:
        """What ``learn`` finds out about the served model (its template's roles, its
        thinking tags' tokens), asked of the server once per model info; a failure is
        not kept, and is asked again."""
        await self.model_info()
        if key not in self._facts:
            self._facts[key] = await learn()
        return cast(_T, self._facts[key])

    def model_names(self, info: ModelInfo) -> list[str]:
        """Names the ``model`` field may use."""
        return [info.model_id, *self.config.served_model_names]

    async def check_model(self, name: str) -> ModelInfo:
        """The model info, or 404 if ``name`` is not the served model."""
        info = await self.model_info()
        if name not in self.model_names(info):
            raise model_not_found(name)
        return info

    async def is_serving(self) -> bool:
        """Whether the gRPC server's health service says SERVING."""
        return (await check_health(self.health_channel)).health == Health.SERVING

    async def check_fits(self, num_chars: int, param: str) -> None:
        """Refuses (400 ``context_length_exceeded``) a prompt of ``num_chars`` characters
        that cannot fit the context whatever its tokens, before tokenizing it."""
        info = await self.model_info()
        if text_checks.cannot_fit(num_chars, info.max_context):
            raise invalid(
                f"This model's maximum context length is {info.max_context} tokens; a "
                f"prompt of {num_chars} characters is more than that",
                param,
                "context_length_exceeded",
            )

    async def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        param: str,
        options: RenderOptions | None = None,
        bounded: bool = True,
        images: list[ImageInput] | None = None,
    ) -> list[int]:
        """Chat messages through the model's chat template, as token ids (by default
        ending with the assistant turn's opening). ``bounded``: a prompt for the model,
        which must fit its context (``check_fits``: the tools' text too, which the
        prompt holds). With ``images`` (fetched), each image's place is as many pad
        tokens as the image takes; else one."""
        options = options or RenderOptions()
        if bounded:
            num_chars = text_checks.text_length(messages) + text_checks.text_length(tools)
            await self.check_fits(num_chars, param)
        info = await self.model_info()
        has_tool_template = template_supports_tools(info.chat_template)
        roles = None
        if needs_roles(messages, tools, has_tool_template):
            with client_errors(param):
                roles = await self.template_roles()
        short_ids = template_wants_short_call_ids(info.chat_template)
        rendered = template_messages(messages, tools, has_tool_template, roles, short_ids)
        with client_errors(param):
            return await self.client.tokenize_chat(
                rendered,
                add_generation_prompt=options.add_generation_prompt,
                tools=tools if has_tool_template else None,
                chat_template_kwargs=options.chat_template_kwargs,
                continue_final_message=options.continue_final_message,
                images=[(image.data, image.mime_type) for image in images or []],
            )

    async def template_roles(self) -> TemplateRoles:
        """Whether the chat template renders a system message and a ``tool`` one
        (``TemplateRoles``), probed once per model info."""

        async def render(messages: list[dict[str, Any]]) -> list[int] | None:
            try:
                return await self.client.tokenize_chat(messages, add_generation_prompt=False)
            except SalienceClientError as error:
                if error.reason != "BAD_MESSAGES":  # not the template's answer
                    raise
                return None

        async def probe() -> TemplateRoles:
            with_tool = await render(TOOL_PROBE)
            tool = with_tool is not None and with_tool != await render(TOOL_PROBE[:-1])
            # Rendered, and not dropped (as Phi-3-medium's template drops it).
            with_system = await render(SYSTEM_PROBE)
            system = with_system is not None and with_system != await render(SYSTEM_PROBE[1:])
            return TemplateRoles(system, tool)

        return await self._learned("template roles", probe)

    async def generation_prompt_length(self, options: RenderOptions) -> int:
        """Tokens the chat template ends a prompt with to open the assistant's turn
        (``add_generation_prompt``; with ``options``' template variables), measured
        once: what the next turn's rendering of the conversation may write otherwise
        (``<think>``). 0 where the template cannot render a lone user message."""
        if not options.add_generation_prompt:
            return 0
        key = json.dumps(options.chat_template_kwargs or {}, sort_keys=True, default=str)

        async def measure() -> int:
            probe = [{"role": "user", "content": "x"}]
            closed = dataclasses.replace(options, add_generation_prompt=False)
            opened = await self.render_chat(probe, [], "messages", options, bounded=False)
            kept = await self.render_chat(probe, [], "messages", closed, bounded=False)
            return len(opened) - common_prefix_length(opened, kept)

        try:
            return await self._learned(f"generation prompt length {key}", measure)
        except ApiError:
            return 0

    async def reasoning(
        self, prompt_ids: list[int], chat_template: str, is_forced: bool, is_constrained: bool
    ) -> Reasoning:
        """How a reply to ``prompt_ids`` reasons: whether the model thinks first (a
        reasoning template, no forced tool call); whether the prompt ends inside an open
        ``<think>`` (its last tokens, images left out, decoded); and, for a constrained
        reply, the thinking tags' tokens the constraint leaves the thinking free with,
        none where a tag is not one token or where the prompt ends with the thinking
        closed (Qwen3's with ``enable_thinking: false``): the constraint then applies
        from the first token, with no thinking."""
        if not template_reasons(chat_template) or is_forced:
            return Reasoning()
        tail = await self._prompt_tail(prompt_ids)
        opens = opens_thinking(tail)
        if not is_constrained or (not opens and closes_thinking(tail)):
            return Reasoning(True, opens)
        tags = await self.thinking_tags()
        if tags is None:
            return Reasoning(True, opens)
        return Reasoning(True, opens, (None if opens else tags[0], tags[1]))

    async def thinking_tags(self) -> tuple[int, int] | None:
        """``<think>`` and ``</think>``'s token ids; None unless each is one token. Asked
        of the server once per model info (it was twice per constrained request)."""

        async def ask() -> tuple[int, int] | None:
            tags = [await self.tokenize(tag, "messages") for tag in (THINK_OPEN, THINK_CLOSE)]
            return (tags[0][0], tags[1][0]) if all(len(ids) == 1 for ids in tags) else None

        return await self._learned("thinking tags", ask)

    async def marker_tokens(self, markers: tuple[str, ...]) -> dict[str, int]:
        """The token id of each of ``markers`` (a tool format's) that is one token of the
        model's tokenizer: a grammar writes it as that token, a special token's text
        being no spelling of it. Asked of the server once per model info."""
        if not markers:
            return {}

        async def ask() -> dict[str, int]:
            ids = {marker: await self.tokenize(marker, "tool_choice") for marker in markers}
            return {marker: tokens[0] for marker, tokens in ids.items() if len(tokens) == 1}

        return await self._learned(f"marker tokens {' '.join(markers)}", ask)

    async def added_special_tokens(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer adds at a text's start and at its end (a BOS:
        ([bos], [])); none where it adds none, or they cannot be told apart from the
        text's own. Asked of the server once per model info."""

        async def ask() -> tuple[list[int], list[int]]:
            with client_errors():
                plain = await self.client.tokenize(_PROBE, add_special_tokens=False)
                added = await self.client.tokenize(_PROBE, add_special_tokens=True)
            for front in range(len(added) - len(plain) + 1):
                if added[front : front + len(plain)] == plain:
                    return added[:front], added[front + len(plain) :]
            return [], []

        return await self._learned("added special tokens", ask)

    async def _prompt_tail(self, prompt_ids: list[int]) -> str:
        """The text of a prompt's last tokens (images left out)."""
        tail = [token_id for token_id in prompt_ids[-THINKING_TAIL_TOKENS:] if token_id >= 0]
        return await self.detokenize(tail, "messages")

    async def tokenize(
        self, text: str, param: str, add_special_tokens: bool = False, bounded: bool = True
    ) -> list[int]:
        """A prompt's text to token ids (errors name ``param``); ``bounded``: it must fit
        the context (``check_fits``; not a prompt to be cut to its last tokens)."""
        if not text:
            return []
        if bounded:
            await self.check_fits(len(text), param)
        with client_errors(param):
            return await self.client.tokenize(text, add_special_tokens=add_special_tokens)

    async def detokenize(self, token_ids: list[int], param: str) -> str:
        """Token ids to text (errors name ``param``)."""
        with client_errors(param):
            return await self.client.detokenize(token_ids)

    async def check_images(self, images: list[ImageInput], param: str) -> None:
        """Images need a model that takes them (the server answers IMAGES_UNSUPPORTED
        otherwise); asked up front so that no session is touched. Remote URLs are
        fetched here when allowed, refused otherwise."""
        if not images:
            return
        info = await self.model_info()
        if not info.supports_images:
            raise invalid(
                f"The model {info.model_id!r} does not take images", param, "images_unsupported"
            )
        for image in images:
            if image.url:
                if not self.config.allow_remote_images:
                    raise invalid(
                        "remote image URLs are not fetched (start the shim with "
                        "--allow-remote-images); send a base64 data: URL",
                        param,
                        "remote_images_disabled",
                    )
                image.data, image.mime_type = await image_fetch.fetch(
                    image.url, self.config.max_image_bytes
                )
                image.url = ""

    async def learn_image_counts(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        param: str,
        options: RenderOptions,
        images: list[ImageInput],
    ) -> None:
        """Asks the server how many placeholder tokens each image it has not yet seen
        takes (``image_token_counts``), for a prompt that is cut by token count before
        any image is appended: ``mark_images`` would count an unseen image as one token,
        so the same request kept more tokens, or cut inside the image, only the first
        time. One more render, the images' places each as many pad tokens as they take."""
        if all(image_marker(image.data) in self.image_token_counts for image in images):
            return
        expanded = await self.render_chat(messages, tools, param, options, False, images)
        pad_id = (await self.model_info()).image_pad_token_id
        grouped = itertools.groupby(expanded, lambda token_id: token_id == pad_id)
        runs = [len(list(run)) for is_pad, run in grouped if is_pad]
        if len(runs) == len(images):  # else each counts as one token, as before
            for image, count in zip(images, runs, strict=True):
                self.image_token_counts[image_marker(image.data)] = count

    def mark_images(
        self, prompt_ids: list[int], images: list[ImageInput], param: str
    ) -> dict[int, ImageInput]:
        """Replaces, in place, each image pad token of ``prompt_ids`` (one per image, in
        order) by the image's marker, repeated as many times as the image is known to
        take; returns marker -> image. Markers are negative ids derived from the
        image's bytes, so the session pool matches prefixes holding the same images."""
        pad_id = self._model_info.image_pad_token_id if self._model_info else None
        positions = [i for i, token_id in enumerate(prompt_ids) if token_id == pad_id]
        if len(positions) != len(images):
            raise invalid(
                f"the prompt has {len(positions)} image places for {len(images)} images", param
            )
        markers: dict[int, ImageInput] = {}
        for position, image in reversed(list(zip(positions, images, strict=True))):
            marker = image_marker(image.data)
            markers[marker] = image
            count = self.image_token_counts.get(marker, 1)
            prompt_ids[position : position + 1] = [marker] * count
        return markers
